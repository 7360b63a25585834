"""The one pipe: transfer (source -> plan -> sink, with read-back), the plans and name policies,
layouts, diff and verify, and the progress bar."""
