"""The one console logger: plain lines, info to stdout and errors to stderr, rank 0 only unless a line is every
rank's, and back in place after Hydra's job logging disabled every existing logger."""

import logging

from jetmoe import log


def test_plain_lines_on_rank_0_only(capsys, monkeypatch):
    logger = log.get_logger("jetmoe.test_log")
    monkeypatch.setenv("RANK", "0")
    logger.info("step 1 | lm 7.5")
    logger.error("error: bad")
    monkeypatch.setenv("RANK", "3")
    logger.info("not from rank 3")
    logger.error("error (rank 3): mine", extra=log.EVERY_RANK)
    out, err = capsys.readouterr()
    assert out == "step 1 | lm 7.5\n" and err == "error: bad\nerror (rank 3): mine\n"


def test_reclaim_after_a_logging_configuration_that_disables_existing_loggers(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logger = log.get_logger("jetmoe.test_log.reclaimed")
    # what Hydra's `disabled` job logging (logging.config with disable_existing_loggers) does to ranks other than 0
    logger.disabled = True
    logging.getLogger("jetmoe").propagate = True
    logger.error("lost", extra=log.EVERY_RANK)
    assert capsys.readouterr().err == ""
    log.reclaim()
    logger.error("error (rank 1): kept", extra=log.EVERY_RANK)
    assert capsys.readouterr().err == "error (rank 1): kept\n"
