"""``in_thread``, which Horovod's test/utils/common.py imports at module level."""

import threading


def in_thread(target, args=(), name=None, daemon=True, silent=False):
    """Run ``target(*args)`` on a new (by default daemon) thread and return the thread."""
    if not isinstance(args, tuple):
        raise ValueError(f"args must be a tuple, not {type(args)}; for a single argument use (arg,)")

    def swallow(*call_args):
        try:
            target(*call_args)
        except Exception:
            pass

    thread = threading.Thread(target=swallow if silent else target, args=args, name=name, daemon=daemon)
    thread.start()
    return thread
