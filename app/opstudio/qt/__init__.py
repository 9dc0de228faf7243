"""The desktop app: PySide6 + pyqtgraph widgets over ``opstudio.core``."""
