"""worker: `fsw-worker`, the BullMQ daemon that answers the portal's face-search jobs from a gallery.

Modules: `jobs` (the job handler), `selfies` (a job's selfie leaves Redis when it ends), `forget` (the
portal's forget-face jobs, and their hidden faces applied to every search), `heartbeat`
(worker id, record, metrics), `stats` (what the heartbeat counts), `service` (one worker process:
queue, pause, reload, signals), `supervisor` (one process per GPU), `reload` (gallery hot reload),
`engine` (GPU engine with CPU fallback), `encode_jobs` (encode jobs for `fsw-index build --fleet`, after
the selfies), `photo_source` (where an encode job's photos are read: `FSW_PHOTOS`, a folder or an http(s)
URL), `settings` (the environment, read once), `defaults` (every tunable, with its reason), `submit`,
`cli`, `__main__` (`python -m worker`).
"""
