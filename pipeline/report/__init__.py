"""The run report: report.md and report.html built from a run folder's JSON files, and its charts."""
