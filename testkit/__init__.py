"""What the tests and the bench share to run fsw as a portal would: not part of the shipped packages.

    photos         the labelled dev faces (`FSW_FACES`, default tests/data/faces), their labels, and an
                   event's photo tree laid out from them (`lay_out`, `PhotoTree`, `STAGES`)
    images         hand-made bad, huge and rotated images
    redis_server   a private redis-server on a free port (`RedisServer`), restartable, optionally persistent
    worker_process a real `fsw-worker run` process and its heartbeat record (`start_worker`, `WorkerProcess`)
    gate           a gate the descriptor engine waits at, so a job stays in hand until a test opens it
                   (`gated_engines` in this process; `python -m testkit.gated_worker` for a worker process)
    jobs           portal jobs for selfie files (`selfie_job`), added and waited for with `worker.submit`
                   (`run_jobs`)
    fleet          encoding fsw-workers for fleet builds (`start_encoder`, gated; `python -m testkit.fleet`)
                   and a fleet gallery compared with a local one

tests/conftest.py turns these into fixtures; `bench/` uses the Redis server, the worker process and
the job submission.
"""
