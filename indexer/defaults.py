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

# The progress bar: at most five redraws a second on a terminal (smooth, and no cost to the build), and
# one line every 10 s in a log (rate and ETA often enough to watch, few enough not to bury the summary).
PROGRESS_TTY_S = 0.2
PROGRESS_LOG_S = 10.0

# eval: the thresholds every run measures, 0.30 to 0.70 in steps of 0.05. They bracket the default
# (0.5) on both sides, from where strangers start to match to where a person's own photos are lost.
EVAL_THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(9))
