"""matcher: from images to faces to descriptors, the gallery on disk, and the search. No CLI, no queue.

Encoding: `images` (load a photo or selfie safely, decoded no larger than needed), `files` (a photo
tree's files, confined to its root), `detectors/` (face detection engines: `yunet`, the default, with its
model in `models/`; dlib's `hog` and `cnn`), `encoder` (detect, align, describe: `Encoder`,
`EncoderSettings`), `engines` (the descriptor engine interface, dlib's), `onnx_engine` (the same network
on ONNX Runtime), `onnx_session` (ONNX Runtime sessions, CUDA or CPU, for both networks),
`onnx_convert` (dlib's .dat -> ONNX, cached, checked by sha256), `models` (dlib's model files).
The gallery (files: docs/gallery-format.md): `layout` (file names, manifest, writer's lock, atomic
replace, hashing), `rows` (the row files as readers need them; `live`, the one visibility rule),
`writer` (`GalleryWriter`: add, remove, forget, commit, a rebuild's switch), `index_file` (the FAISS
file: checked, then memory-mapped), `gallery` (`Gallery.open`: a version in memory, searched),
`forgotten` (faces hidden at a person's request), `verify` (what `fsw-index verify` checks).
Search: `search` (the matching rule, `Match`), `scan` (the flat scan within a radius, split over cores,
a stage's rows only), `gpu` (FAISS on a GPU, the CPU scan as fallback), `expansion` (query expansion),
`query` (a selfie's search, the one path of `fsw-index search` and every job).
`defaults` (every tunable, with its reason), `errors` (one type per kind of problem a person can fix).
`matcher` imports neither `indexer` nor `worker`, and reads no environment variable: the edges (the CLIs,
the worker's settings, `python -m matcher.onnx_convert`) do, and pass values in.
"""
