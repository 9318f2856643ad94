"""The mammoflag Celery app with a short broker visibility timeout, for the killed-worker test.

A Redis message whose worker died unacked is delivered again only after the visibility
timeout (in production: the retrain time limit + 10 minutes). Here it is seconds, so a
second worker picks the run up within the test. Everything else is the production app.
"""

from mammoflag.settings import Settings
from mammoflag.worker import create_worker_app

VISIBILITY_TIMEOUT_S = 12

app = create_worker_app(Settings.from_env())
app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S, "unacked_restore_interval": 2,
                                     "unacked_restore_throttle": 1}
