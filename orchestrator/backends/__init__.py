"""The backends, one file per library: `synthetic` (tests), `diffusers_wan`, `diffsynth_wan`, `command`.

Their interface (`Backend`, `BackendProblem`, `OutOfMemory`) and the registry that names them
(`BACKENDS`, `backend_class`) are `orchestrator.backend`, which imports none of them; what they share
besides is `shared`, and `cuda` what they share about GPU memory. Nothing is imported here: a backend's
module (and its library, torch among them) is imported when `backend_class` first asks for it.
"""
