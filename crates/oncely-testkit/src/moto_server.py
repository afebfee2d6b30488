"""moto's DynamoDB emulator on loopback for Oncely's tests and benchmarks, applying one
request at a time.

    python moto_server.py HOST PORT LOGFILE

`moto_server -p PORT` serves requests on threads, and moto's DynamoDB checks a
condition and writes the item without a lock in between: two concurrent conditional
writes of one item can both succeed (reproduced with moto 5.2.5 when Python switches
threads often: the window is narrow, but real). DynamoDB applies each
conditional write to an item atomically, and the stores' tests rely on that, so this
server holds one lock around each request. Otherwise it is `moto_server`: the same
application, request handler and threads (a slow client never blocks another's
connection). It uses moto's `moto.moto_server.werkzeug_app` module, which scripts/test
installs at a pinned version.
"""

import logging
import sys
import threading

host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.stdout = sys.stderr = open(log, "a", buffering=1)
# One line per request would be most of the log and a good part of the time.
logging.getLogger("werkzeug").setLevel(logging.WARNING)

from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, run_simple  # noqa: E402

# werkzeug listens with a backlog of 128: a test with a thousand concurrent callers
# would have connections reset before moto ever saw them.
BaseWSGIServer.request_queue_size = 4096

app = DomainDispatcherApplication(create_backend_app)
one_at_a_time = threading.Lock()


def serialised(environ, start_response):
    with one_at_a_time:
        # The whole body is produced under the lock: the item is read and written there.
        return list(app(environ, start_response))


print(f"moto on {host}:{port}, one request at a time", flush=True)
run_simple(host, port, serialised, threaded=True, request_handler=MotoRequestHandler)
