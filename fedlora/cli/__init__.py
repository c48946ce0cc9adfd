"""The commands: ``fedlora`` (:mod:`~fedlora.cli.main`, its subcommands in
:mod:`~fedlora.cli.commands`), ``fedlora-server`` and ``fedlora-client``
(:mod:`~fedlora.cli.deploy`); what they share is :mod:`~fedlora.cli.common`."""
