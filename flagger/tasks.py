"""Celery task ``mammoflag.flag_shard(job)``: a thin shell around ``flagger.distributed.run_shard``.

The model is loaded once per worker process (kept on the task object, which Celery
creates once per process) and reused for every shard of the same model file.
"""

from __future__ import annotations

from pathlib import Path

from celery import Task, shared_task

from flagger.distributed import TASK_NAME, ShardJob, run_shard
from flagger.records import UnitKind


class FlagShardTask(Task):
    """The task class holds this worker process's loaded classifier between shards."""

    _loaded: tuple[tuple[str, str], object] | None = None

    def classifier_for(self, job: ShardJob):
        wanted = (job.model_path, job.model_file)
        if self._loaded is None or self._loaded[0] != wanted:
            from mammoflag.inference import OnnxClassifier
            from mammoflag.registry import INT8_FILE, read_version

            version = read_version(Path(job.model_path))
            classifier = OnnxClassifier(version, prefer_int8=job.model_file == INT8_FILE, threads=job.ort_threads)
            self._loaded = (wanted, classifier)
        return self._loaded[1]


@shared_task(name=TASK_NAME, bind=True, base=FlagShardTask, acks_late=True, reject_on_worker_lost=True)
def flag_shard(self: FlagShardTask, job: dict) -> dict:
    from mammoflag.jobs import settings_of

    shard = ShardJob.from_json(job)
    settings = settings_of(self.app)
    secret = settings.patient_key_secret.get() if shard.input_kind in (UnitKind.DICOM, UnitKind.DICOMWEB) else None
    dicomweb = None
    if shard.input_kind is UnitKind.DICOMWEB:
        from flagger.sources import DicomWebInput
        from mammoflag.dicomweb import DicomWebAuth, DicomWebSource, RetryPolicy

        # this worker's own credentials (MAMMOFLAG_DICOMWEB_*): the job file carries none
        dicomweb = DicomWebInput(DicomWebSource.parse(shard.dicomweb_url), DicomWebAuth.from_settings(settings),
                                 RetryPolicy.from_settings(settings))
    return run_shard(shard, self.classifier_for(shard), secret, dicomweb)
