"""Every tunable of the indexer, with why it has its value (in the manner of rq's `defaults.py`).

The command-line flags that set some of these show them as their defaults; nothing here is read from
the environment.
"""

from __future__ import annotations

# build/add: seconds between commits of finished photos. A crash or Ctrl-C loses at most this much
# encoding; each commit rewrites the manifest and may merge row files, so not much more often.
CHECKPOINT_S = 30.0

# build/add: encoder processes when --jobs is not given; None means one per core the process may use
# (`matcher.encoder.cores`), since encoding is CPU-bound and each process runs one photo at a time.
JOBS: int | None = None

# build/add: photos handed to the process pool per encoder process. Enough that none waits while the
# parent records a finished photo; a task is only a path, so more would just delay Ctrl-C.
TASKS_PER_JOB = 3

# build/add --fleet: photos per encode job. A job costs the queue a few milliseconds (add, fetch, finish,
# read, remove) against about 0.4 s of encoding a photo: 4 keep that under 1%, while a worker that dies
# loses little and the last jobs of a build still spread over the fleet.
FLEET_BATCH = 4
# build/add --fleet: encode jobs on the queue at once. Keeps 64 single-slot workers busy; hashing runs
# only this far ahead of encoding, and Redis holds a bounded amount of a build.
FLEET_IN_FLIGHT = 128
# build/add --fleet: attempts per encode job, 2 s apart (a worker refusing it counts one, so another
# worker gets the next); a worker dying with it is BullMQ's stalled check, not an attempt.
FLEET_ATTEMPTS = 3
FLEET_RETRY_DELAY_MS = 2_000
# build/add --fleet: how often the indexer looks for finished jobs (the queue keeps the workers busy
# meanwhile), and for jobs Redis lost (a restart without persistence) to enqueue again.
FLEET_POLL_S = 0.2
FLEET_LOST_CHECK_S = 5.0
# build/add --fleet: first and longest pause between attempts to reach Redis while it is away (doubling);
# at the start, 3 attempts (1.5 s): a wrong address is reported rather than waited on.
FLEET_REDIS_WAIT_S = (0.5, 10.0)
FLEET_CONNECT_ATTEMPTS = 3
# build/add --fleet: say so when no worker has taken an encode job for this long (none running, all
# paused, or all started with --no-encode); a photo takes well under a second.
FLEET_IDLE_WARN_S = 30.0

# The progress bar: at most five redraws a second on a terminal (smooth, and no cost to the build), and
# one line every 10 s in a log (rate and ETA often enough to watch, few enough not to bury the summary).
PROGRESS_TTY_S = 0.2
PROGRESS_LOG_S = 10.0

# eval: the thresholds every run measures, 0.30 to 0.70 in steps of 0.05. They bracket the default
# (0.5) on both sides, from where strangers start to match to where a person's own photos are lost.
EVAL_THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))
