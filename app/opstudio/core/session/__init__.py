"""The document being edited in the app and its edits."""
