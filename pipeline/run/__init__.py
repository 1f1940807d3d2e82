"""`rotaq run`: its configuration, its plan of stages, their cache keys and markers, the run itself, and the
files a run folder holds (results.json, the summary rows). Imports stages only by name (stage_registry)."""
