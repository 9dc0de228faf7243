"""The Qt-free core of opstudio: loading, analysis, profiling, passes, accuracy, reports."""
