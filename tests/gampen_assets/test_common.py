"""Errors no retry can fix fail a step at once."""

from __future__ import annotations

import pytest
from dagster import Failure

from gampen_assets.assets._common import fail_fast_on_bad_input
from gampen_ml.io import StorageError


@pytest.mark.parametrize(
    "error",
    [StorageError("missing PSF library file /x/psfs.fits"), FileNotFoundError("/x/model.json")],
)
def test_a_missing_upstream_fails_without_retries(error):
    with pytest.raises(Failure) as failure:
        with fail_fast_on_bad_input():
            raise error
    assert failure.value.allow_retries is False
    assert str(error) in failure.value.description


def test_other_errors_pass_through_to_the_retry_policy():
    with pytest.raises(MemoryError):
        with fail_fast_on_bad_input():
            raise MemoryError("transient")
