"""``chatctl``: the sysadmin's command line, speaking msgpack to the master's control socket.

:mod:`~chatd.ctl.main` parses the command line and talks to the socket;
:mod:`~chatd.ctl.statusfmt` turns the status document into the table a sysadmin reads and
decides the exit code. May import ``proto`` and the shared top-level modules; imports nothing of
``master`` or ``worker`` (it reads what the master sends, as any script could).
"""
