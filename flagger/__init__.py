"""Cohort flagging: batch ONNX inference to study-level flags, human labels first, resumable, distributable.

- ``core.flag_cohort``: the pure core behind ``mammoflag flag`` (``cli.py``).
- ``sources``: work units from an import DATA_DIR or a DICOM folder; decode to model inputs.
- ``pipeline``: decode processes feeding batched ONNX inference, with bounded memory.
- ``checkpoint``: the SQLite file per-image results are appended to (resume, aggregation).
- ``outputs``: flags.csv / images.csv / errors file, streamed from the checkpoint.
- ``labels``: human labels from a Label Studio export or project.
- ``distributed`` + ``tasks``: shards as Celery tasks ``mammoflag.flag_shard``.
- ``cohort``: ``mammoflag cohort`` (select and summarise a flagged cohort).
"""
