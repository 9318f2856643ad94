"""The per-project run lock, the 'rerun wanted' flag and the 'retrain queued' mark, for both brokers' stores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mammoflag.jobs import QUEUED_MARK_TTL_S, FileRunLock, RedisRunLock


def test_file_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    first, second = FileRunLock(tmp_path, 7), FileRunLock(tmp_path, 7)
    assert first.acquire("run-1")
    assert not second.acquire("run-2")
    assert FileRunLock(tmp_path, 8).acquire("other-project")
    first.release("run-1")
    assert second.acquire("run-2")
    second.release("run-2")
    # a process that dies holding the lock (SIGKILL) frees it: the kernel drops flocks
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[2])!r})
from mammoflag.jobs import FileRunLock
assert FileRunLock({str(tmp_path)!r}, 7).acquire('doomed')
print('held', flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.wait(10)
    assert FileRunLock(tmp_path, 7).acquire("after")


def test_file_rerun_flag_coalesces_and_force_wins(tmp_path):
    lock = FileRunLock(tmp_path, 3)
    assert lock.take_rerun() is None
    lock.want_rerun(False)
    lock.want_rerun(False)
    assert lock.take_rerun() == "normal" and lock.take_rerun() is None
    lock.want_rerun(False)
    lock.want_rerun(True)
    lock.want_rerun(False)
    assert lock.take_rerun() == "force"


@pytest.mark.services
def test_redis_lock_expires_and_lets_its_own_redelivery_back_in(redis_url):
    import redis

    lock = RedisRunLock(redis_url, 99, ttl_s=30)
    assert lock.acquire("task-a")
    assert not RedisRunLock(redis_url, 99, ttl_s=30).acquire("task-b")
    assert RedisRunLock(redis_url, 99, ttl_s=30).acquire("task-a")  # same task id: a redelivered message
    assert 0 < redis.Redis.from_url(redis_url).ttl(lock.key) <= 30
    lock.release("task-b")  # not the holder: nothing happens
    assert not RedisRunLock(redis_url, 99, ttl_s=30).acquire("task-c")
    lock.release("task-a")
    assert RedisRunLock(redis_url, 99, ttl_s=30).acquire("task-c")
    lock.want_rerun(False)
    lock.want_rerun(True)
    assert lock.take_rerun() == "force" and lock.take_rerun() is None
    RedisRunLock(redis_url, 99, ttl_s=30).release("task-c")


def _check_queued_mark(make_lock) -> None:
    webhook, run = make_lock(), make_lock()
    assert webhook.mark_queued()  # nothing waiting: send a retrain
    assert not make_lock().mark_queued()  # one is waiting: a burst of annotations sends no more
    run.clear_queued()  # the run starts (before it reads Label Studio)
    assert webhook.mark_queued()  # an annotation made now needs a new message
    run.clear_queued()
    run.clear_queued()  # clearing twice is harmless


def test_file_queued_mark_lets_one_retrain_wait_and_expires(tmp_path):
    _check_queued_mark(lambda: FileRunLock(tmp_path, 5))
    lock = FileRunLock(tmp_path, 5)
    assert lock.mark_queued() and not lock.mark_queued()
    # a mark whose message was lost (broker flushed) stops blocking after QUEUED_MARK_TTL_S
    old = time.time() - QUEUED_MARK_TTL_S - 1
    os.utime(lock.queued_path, (old, old))
    assert lock.mark_queued() and not lock.mark_queued()
    assert FileRunLock(tmp_path, 6).mark_queued()  # per project


@pytest.mark.services
def test_redis_queued_mark_lets_one_retrain_wait_and_expires(redis_url):
    import redis

    _check_queued_mark(lambda: RedisRunLock(redis_url, 98, ttl_s=30))
    lock = RedisRunLock(redis_url, 98, ttl_s=30)
    assert lock.mark_queued()
    assert 0 < redis.Redis.from_url(redis_url).ttl(lock.queued_key) <= QUEUED_MARK_TTL_S
    lock.clear_queued()
