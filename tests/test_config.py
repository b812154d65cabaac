"""EPRConfig: settings out of range raise typed errors; round trip through a dict."""

import pytest

from hf_epr import EPRConfig, EPRConfigError, EPRError


@pytest.mark.parametrize("bad", [dict(rate_lambda=-1), dict(precision=20), dict(dct_grouping="zigzag"),
                                 dict(raw_dtype="int8"), dict(dense_decoder="nope"), dict(max_table_symbols=2)])
def test_bad_settings_raise_typed_errors(bad):
    with pytest.raises(EPRConfigError):
        EPRConfig(**bad)
    assert issubclass(EPRConfigError, EPRError)


def test_dict_round_trip_ignores_unknown_keys():
    config = EPRConfig(rate_lambda=0.3, density_filters=(2, 2))
    again = EPRConfig.from_dict({**config.to_dict(), "from_a_newer_version": 1})
    assert again == config and again.to_dict()["density_filters"] == [2, 2]
