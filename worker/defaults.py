"""Every tunable of the worker in one place, each with the reason for its value (as python-rq's `defaults.py`).

Modules import these names. What the portal's dashboard relies on stays in the contract (`schemas`: the
queue's name, `ONLINE_WINDOW_S`); the selfie's limits are the matcher's (`matcher.defaults`); values a
deployment sets come from the environment through `worker.settings`, whose defaults are here.
"""

from __future__ import annotations

# -- configuration defaults (`worker.settings`) -----------------------------------------------------------

# (The default Redis URL and its connect timeout: `schemas.connection`, shared with `fsw-index --fleet`.)
# One job at a time per process: its encoding already uses every core the process is given.
DEFAULT_CONCURRENCY = 1
# More jobs at once than this only queue up on the cores; a larger number is a typo.
MAX_CONCURRENCY = 64
# Encode jobs (`fsw-index --fleet`) at once per process: one photo's detection already takes a core, and
# the search jobs keep threads of their own; an operator gives a big machine more, or 0 (never encode).
DEFAULT_ENCODE_CONCURRENCY = 1

# -- BullMQ (`worker.service`) --------------------------------------------------------------------------

# A job takes well under a second. Half BullMQ's defaults (30 s) for the lock and the stalled-job check:
# the jobs of a worker that died are handed to another one within about 30 s instead of 60.
LOCK_DURATION_MS = 15_000
STALLED_INTERVAL_MS = 15_000
# How long BullMQ waits after a failed fetch; its default, 15 s, is slow to resume after Redis returns.
RUN_RETRY_DELAY_MS = 2_000

# -- the worker's own loops (`worker.service`, `worker.reload`) ------------------------------------------

# The dashboard calls a worker online while its heartbeat is under `schemas.ONLINE_WINDOW_S` (15 s) old:
# every 5 s, two beats can be lost before it shows offline.
HEARTBEAT_INTERVAL_S = 5.0
# An operator's pause takes effect within a second; a GET a second costs Redis nothing.
PAUSE_POLL_S = 1.0
# A new gallery version is picked up within 2 s of its commit; each poll reads one small manifest file.
RELOAD_POLL_S = 2.0
# While a worker has no gallery to serve (none yet, or a malformed one), it says why this often: one line,
# often enough to be seen in a log being watched, not a line at every poll.
GALLERY_WAITING_LOG_S = 10.0
# The longest a graceful stop waits for the jobs in hand (a job takes well under a second; this covers a
# stuck one without hanging a deployment's restart for long).
GRACEFUL_STOP_S = 120.0
# The longest each closing step (a background loop, BullMQ's run loop) is waited for once the jobs are done.
CLOSE_WAIT_S = 10.0
# Attempts at writing the final "offline" record, a second apart: a Redis hiccup at exit should not leave
# the dashboard showing a live worker until the record ages out.
OFFLINE_BEAT_ATTEMPTS = 5
# Loading the models takes about a second a thread; two minutes means something is wrong, not slow.
WARM_UP_TIMEOUT_S = 120.0
# A lost Redis connection is logged once a minute per kind of error, not at every retry.
QUEUE_ERROR_LOG_EVERY_S = 60.0

# -- reaching Redis (`worker.service`) -------------------------------------------------------------------

# The worker's own commands (heartbeat, pause, excluded set) retry twice, 0.2 s then up to 2 s apart: a
# blip is ridden out, an outage is reported by the caller.
REDIS_RETRIES = 2
REDIS_RETRY_BACKOFF_S = (0.2, 2.0)  # base and cap of the exponential backoff
# Waiting for Redis at start or after an outage: first and longest pause between attempts (doubling).
REDIS_WAIT_S = (0.5, 10.0)

# -- the selfie in Redis (`worker.selfies`, `worker.jobs`, `worker.submit`) -------------------------------

# A Redis command of the handler that found Redis away (the excluded set, removing the selfie) is tried
# again for as long as the job's lock lasts without renewal; past that, BullMQ's stalled-job check runs the
# job again (it is not failed for the outage) and this attempt's answer could not be recorded anyway.
REDIS_AWAY_IN_JOB_S = LOCK_DURATION_MS / 1000
# The sweep for finished jobs that still hold a selfie (one BullMQ failed without running the handler, as
# a job stalled twice): as often as the stalled-job check, so such a selfie stays about as long as that.
SELFIE_SWEEP_S = STALLED_INTERVAL_MS / 1000
# A sweep also looks at jobs that finished this long before the previous one began: finish times come from
# the clocks of the workers that finished them, which may run behind this one's.
SELFIE_SWEEP_OVERLAP_S = 300.0
# Jobs whose data one round trip of a sweep reads: up to 20 MB each, if every one held a selfie.
SELFIE_SWEEP_BATCH = 20
# How long BullMQ keeps a finished job: the portal's own options, which `fsw-worker submit` sends too, so
# a result or failure can be read by job id for a day (a week for failures) and no job is kept forever.
REMOVE_ON_COMPLETE = {"age": 24 * 3600, "count": 1000}
REMOVE_ON_FAIL = {"age": 7 * 24 * 3600}

# -- encode jobs for fsw-index --fleet (`worker.encode_jobs`, `worker.photo_source`) ----------------------

# How often a held encode job looks again whether the search queue is clear: a selfie's wait for the
# photo in progress dwarfs it, and two Redis reads 20 times a second cost Redis nothing.
SEARCH_CLEAR_POLL_S = 0.05
# Added to the nice value of the encode threads (and the ONNX Runtime threads they start): a photo in
# progress yields the CPU to a selfie that arrives meanwhile (the kernel gives +10 about a tenth of the share).
ENCODE_NICE = 10
# A photo larger than this is refused before it is read whole: an event photo is 2-30 MB; 200 MB covers a
# 64-megapixel PNG (the decoder's own pixel limit) and keeps a runaway response from filling memory.
MAX_PHOTO_BYTES = 200 * 1024 * 1024
# The longest a photo's HTTP fetch may take, all of it: a healthy server sends 30 MB in a fraction of that;
# a stuck one must not hold an encode thread (and its batch) for long.
FETCH_TIMEOUT_S = 30.0

# -- the heartbeat record and the registry (`worker.stats`, `worker.heartbeat`) --------------------------

# Recent latencies kept for the heartbeat's medians: a few minutes of a busy worker's jobs.
LATENCY_WINDOW = 200
# Worker id suffixes tried (`_2`, `_3`...) when live workers hold the base id: far above the processes one
# host runs (one per GPU), low enough that a runaway restart loop is noticed.
MAX_ID_SUFFIX = 64

# -- the supervisor of one process per GPU (`worker.supervisor`) -----------------------------------------

# First and longest pause before restarting a child that died, doubling with each failure in a row: a
# crash is retried at once, a crash loop does not spin.
RESTART_DELAY_S = (1.0, 60.0)
