"""The master: everything that runs only in the pre-fork arbiter process.

The arbiter loop (:mod:`~chatd.master.arbiter`), chatctl's commands and the operations they start
(reload, roll, scale, shutdown), forking and supervising workers, the listening sockets, the
daemon-wide LLM slot granter and its services, the control server and its peer check, systemd
notify and the status document. May import ``proto`` and the shared top-level modules; never
imports ``worker``, ``relay`` or ``store`` (the master knows no session and no LLM wire format,
and it creates no event loop). Only ``chatd.cli`` imports it.
"""
