"""worker: `fsw-worker`, the BullMQ daemon that answers the portal's face-search jobs from a gallery.

Modules: `jobs` (the job handler), `selfies` (a job's selfie leaves Redis when it ends), `forget` (the
portal's forget-face jobs, and their hidden faces applied to every search), `heartbeat`
(worker id, record, metrics), `service` (one worker process: queue, pause, reload, signals),
`supervisor` (one process per GPU), `reload` (gallery hot reload), `engine` (GPU engine with CPU
fallback), `settings`, `submit`, `cli`.
"""
