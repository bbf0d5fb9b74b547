import os
import sys
import threading

from . import cli

code = cli.main()
if code != 0 and (cli.cancelled or any(thread.name == "unetsegment-work" and thread.is_alive()
                                       for thread in threading.enumerate())):
    # cancelled (possibly while the work thread is inside a long C call, which writes nothing): do not
    # wait for it nor for torch's teardown; the main thread's `finally` blocks already removed temp files
    from .publish import _remove_live_temps

    _remove_live_temps()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
