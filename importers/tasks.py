"""Celery task ``mammoflag.import_shard(job)``: a thin shell around ``importers.distributed.run_import_shard``.

The patient-key secret is the worker's own (``MAMMOFLAG_PATIENT_KEY_SECRET``): job files carry none.
"""

from __future__ import annotations

from celery import shared_task

from importers.distributed import TASK_NAME, ImportShardJob, run_import_shard


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def import_shard(self, job: dict) -> dict:
    from mammoflag.jobs import settings_of

    settings = settings_of(self.app)
    return run_import_shard(ImportShardJob(**job), settings.patient_key_secret.get())
