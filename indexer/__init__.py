"""indexer: `fsw-index`, which builds, extends, checks and measures a gallery from a photo tree.

Modules: `cli` (the commands: docs/cli.md), `scan` (find the photos and name them), `pipeline`
(`index_photos`: hash, encode, commit at checkpoints), `encoding` (the encode step: `LocalEncoding`, a
process pool on this machine), `fleet` (`FleetEncoding`: the encode step on every fsw-worker through
Redis, `--fleet`; docs/fleet.md), `progress` (the tqdm bar, or a line every 10 s in a log), `rebuild`
(`fsw-index rebuild`: encode a gallery again with other settings, staged, then switched), `forget`
(`fsw-index forget`: hide a person's faces, list, undo, take in the portal's forgets). `fsw-index eval`
(docs/accuracy.md): `labels` (the one labels CSV parser), `scoring` (pure counts per threshold),
`report` (table, JSON, plot), `evaluate` (the run that ties them); `detection_eval` (`fsw-index
eval-detection`: detector recall on annotated photos). `defaults` (every tunable, with its reason).
"""
