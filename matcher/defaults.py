"""Every tunable of `matcher` in one place, each with the reason for its value (as python-rq's `defaults.py`).

Modules import these names; nothing here reads the environment. The edges do that (the `fsw-index` CLI,
the worker's settings, `python -m matcher.onnx_convert`) and pass values in as parameters. The encoder's
own defaults (detection size, upsampling, jitters) are fields of `matcher.encoder.EncoderSettings`: they
are recorded in a gallery, and a settings object is where a reader looks for them.
"""

from __future__ import annotations

from pathlib import Path

# The similarity a match must exceed, and the range a caller may ask for, are the job contract's numbers:
# imported from `schemas.job`, not written twice. 0.5 is face_recognition's distance of 0.5; below 0.2
# nearly everyone matches, above 0.9 nearly no one does.
from schemas.job import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from schemas.job import MAX_THRESHOLD as MAX_THRESHOLD
from schemas.job import MIN_THRESHOLD as MIN_THRESHOLD

# -- where things are ----------------------------------------------------------------------------------

# The gallery folder when none is named (flag --gallery, or FSW_GALLERY at the edges).
DEFAULT_GALLERY = Path("gallery")
# Converted ONNX models, derived from dlib's .dat file (FSW_CACHE_DIR at the edges); `~` expanded at use.
CACHE_DIR = Path("~/.cache/fsw")

# -- images --------------------------------------------------------------------------------------------

# A 64 MP photo decodes to 192 MB of RGB: above any event camera's photos, below a memory problem.
PHOTO_MAX_PIXELS = 64_000_000
# A phone's largest photos are about 50 MP; a selfie needs far fewer, and a job decodes one per thread.
SELFIE_MAX_PIXELS = 40_000_000
# HOG finds faces down to about 40 px with the selfie's upsampling; a smaller picture cannot hold one.
MIN_SELFIE_SIDE = 40

# -- forgotten faces (`matcher.forgotten`) ---------------------------------------------------------------

# A forgotten person's face is hidden when its similarity to their selfie exceeds this: a little below the
# search's 0.5, because a search may come with another selfie of them. Measured on the dev faces (19
# people, each forgotten with one query, then every query of theirs searched at 0.5 with expansion): at
# 0.5, 3 of their 71 photos still came back; at 0.45, none, and no other person lost a photo; at 0.4 one
# did, at 0.35 thirteen.
FORGET_THRESHOLD = 0.45

# -- query expansion (`matcher.expansion`) -------------------------------------------------------------

# "Well above the threshold": at the default 0.5 a confident face is within distance 0.45.
EXPANSION_MARGIN = 0.05
# One confident face that agrees with the others is enough: the agreement check, not a count, keeps a
# look-alike from pulling the query.
EXPANSION_MIN_MATCHES = 1

# -- the scan (`matcher.scan`) ---------------------------------------------------------------------------

# A scan is split over threads only in parts of at least 65,536 rows (32 MiB, ~2 ms at memory speed):
# handing a part to a thread costs tens of microseconds, and a stage of a few thousand faces is scanned
# faster by one thread than that.
SCAN_MIN_ROWS_PER_THREAD = 1 << 16
# A stage's rows that lie in runs shorter than this are copied together and scanned in one FAISS call: a
# call costs about as much as scanning a thousand rows, so a stage scattered by many small `add`s costs
# at most about twice its rows.
SCAN_GATHER_ROWS = 1024

# The principal components a codes file keeps (`matcher.coarse`): 64 bytes a face, half the bytes of 128
# components, for a scan twice as fast. On 224 real faces of the WIDER event photos (PCA fitted on them, a
# selfie of the dev set against each), 64 components let in no more faces within 0.52 than all 128 (0.02%
# of pairs), 48 let in 0.33%.
COARSE_DIMS = 64
# The k-NN searches that stand in for a range search on the 8-bit codes (`matcher.coarse`) start at this k,
# in each core's share of the codes. Keeping k neighbours costs: at 1M faces on 2 cores a scan took 1.9 ms
# with k = 256, 2.5 ms with 1024 and 1.8 ms with 64. Each doubling costs a pass more, and a person's photos
# in one share of an archive, with the near misses the codes let in, are rarely more than 256.
COARSE_FIRST_K = 256
# Past this many rows near a query in one thread's share, the float32 scan (FAISS's range search, one pass
# whatever the matches) is cheaper than doubling k again: a threshold far below the default.
COARSE_MAX_K = 8192

# -- FAISS on a GPU (`matcher.gpu`) ---------------------------------------------------------------------

# The first k of the k-NN searches that stand in for a range search on a GPU: more than the photos a
# person appears in at one event, so one search nearly always suffices; k doubles while it does not.
GPU_FIRST_K = 1024
# FAISS's GPU k-selection returns at most 2048 neighbours; a search with more matches is done on the CPU.
GPU_MAX_K = 2048
# Below this many rows the CPU scans as fast as a trip to the device (a few hundred microseconds).
GPU_MIN_ROWS = 1 << 16
# Squared distance added to the GPU's radius: the GPU computes |x|^2 + |q|^2 - 2 x.q in float32 (off by
# ~1e-5 at descriptor norms, more if TF32 were on); the float64 recheck on the CPU drops the extra rows.
GPU_RADIUS_SLACK = 1e-3

# -- the descriptor engine -----------------------------------------------------------------------------

# Chips per ONNX Runtime call; larger batches are split, which bounds the activation memory (on a GPU too).
ONNX_MAX_BATCH = 64

# -- the gallery's files (`matcher.layout`, `matcher.rows`, `matcher.writer`) --------------------------

# Hashing reads 1 MiB at a time: disk speed, without holding a whole photo in memory.
HASH_BLOCK_BYTES = 1 << 20
# Rows per HDF5 chunk: 1024 descriptors are 512 KiB, 4096 rows of the other columns at most 32 KiB; chunks
# of tens of KiB to about 1 MiB read fast whole and waste little when a file holds few rows.
H5_CHUNK_ROWS = 4096
H5_DESCRIPTOR_CHUNK_ROWS = 1024
# Descriptors are read into FAISS in blocks of 65,536 rows (32 MiB): memory stays bounded on any gallery.
DESCRIPTOR_READ_ROWS = 1 << 16
# A row file is merged with the newer rows after it when they weigh at least 1/MERGE_RATIO of it. With 2
# (the "logarithmic method") a gallery keeps about log2(rows) files and rewrites each row about log2(rows)
# times in its life, while a small `add` writes a small file.
MERGE_RATIO = 2
# A new FAISS file is written when the faces after the last one exceed this share of all faces; below it,
# readers add those rows from the row files, so a small `add` costs no rewrite of the index.
INDEX_REWRITE_SHARE = 0.25
# A reader whose load fails because a writer committed meanwhile (and deleted a file the version it read
# named) loads the new version at once; 20 commits in a row during one load is a gallery gone wrong. A load
# that fails under an unchanged manifest is not tried again: the same files would fail the same way.
GALLERY_OPEN_ATTEMPTS = 20
# `fsw-index verify` checks again when a version was committed while it read; after 5 it reports what it
# read, rather than chase a writer that commits faster than a check.
VERIFY_ATTEMPTS = 5
