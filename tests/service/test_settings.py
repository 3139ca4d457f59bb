"""service.settings: the flat GGA_* variables read into groups, errors naming the variable, the checks
across fields, and the deprecated GGA_ALPHA."""

from __future__ import annotations

import warnings

import pytest

from service.settings import ENV_NAMES, GROUPS, Settings, SettingsError


def test_every_variable_lands_in_its_group(monkeypatch, tmp_path):
    values = {"GGA_MODEL": "cifar_resnet20", "GGA_MODEL_WEIGHTS": str(tmp_path / "w.safetensors"),
              "GGA_SERVE_ALPHA": "0.2", "GGA_HOST": "0.0.0.0", "GGA_GUARDED_PROTOCOL": "true",
              "GGA_MAX_BATCH_ROWS": "8", "GGA_MAX_QUEUE_ROWS": "8", "GGA_MAX_DELAY_MS": "5",
              "GGA_MAX_CONCURRENT_REQUESTS": "3", "GGA_ADMIN_TOKEN": "secret", "GGA_DETECTOR": "gga",
              "GGA_FIT_ALPHA": "0.01", "GGA_FIT_BATCH_SIZE": "32", "GGA_ARTIFACT_DIR": str(tmp_path / "a"),
              "gga_reload_interval_s": "0"}  # names match without regard to case, as before
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = Settings(_env_file=None)
    assert (s.model.name, s.model.weights, s.model.alpha) == ("cifar_resnet20", tmp_path / "w.safetensors", 0.2)
    assert (s.server.host, s.server.guarded_protocol, s.server.port) == ("0.0.0.0", True, 8000)
    assert (s.batching.max_batch_rows, s.batching.max_queue_rows, s.batching.max_delay_ms) == (8, 8, 5.0)
    assert s.limits.max_concurrent_requests == 3 and s.auth.admin_token.get_secret_value() == "secret"
    assert (s.fit.preset, s.fit.alpha, s.fit.batch_size) == ("gga", 0.01, 32)
    assert (s.storage.artifact_dir, s.storage.reload_interval_s) == ((tmp_path / "a").resolve(), 0.0)
    # the constructor takes the same names, lower case, without the prefix; they win over the environment
    assert Settings(_env_file=None, max_batch_rows=4, max_queue_rows=4).batching.max_batch_rows == 4
    # 32 settings, each in one group, every group field reachable by one variable
    assert len(ENV_NAMES) == 32 == sum(len(cls.model_fields) for cls in GROUPS.values())
    assert ENV_NAMES["GGA_MAX_IMAGE_PIXELS"] == ("limits", "max_image_pixels")
    assert ENV_NAMES["GGA_MAX_BATCH_ROWS"] == ("batching", "max_batch_rows")
    assert ENV_NAMES["GGA_DETECTOR"] == ("fit", "preset") and ENV_NAMES["GGA_SERVE_ALPHA"] == ("model", "alpha")


def test_flat_reads_say_where_the_setting_lives():
    s = Settings(_env_file=None)
    with pytest.raises(AttributeError, match=r"read settings\.batching\.max_batch_rows"):
        s.max_batch_rows  # noqa: B018
    with pytest.raises(AttributeError, match=r"settings\.model\.alpha .*settings\.fit\.alpha"):
        s.alpha  # noqa: B018


@pytest.mark.parametrize(("env", "message"), [
    ({"GGA_MAX_BATCH_ROWS": "0"}, "GGA_MAX_BATCH_ROWS='0': Input should be greater than or equal to 1"),
    ({"GGA_PORT": "70000"}, "GGA_PORT='70000': Input should be less than or equal to 65535"),
    ({"GGA_SERVE_ALPHA": "1.5"}, "GGA_SERVE_ALPHA='1.5': Input should be less than 1"),
    ({"GGA_MAX_BATCH_ROWS": "128", "GGA_MAX_QUEUE_ROWS": "100"},
     "GGA_MAX_QUEUE_ROWS (100) is below GGA_MAX_BATCH_ROWS (128): the queue could never hold one full batch"),
    ({"GGA_MAX_DELAY_MS": "2000", "GGA_REQUEST_TIMEOUT_S": "2"},
     "GGA_REQUEST_TIMEOUT_S (2 s) is not above GGA_MAX_DELAY_MS (2000 ms): a request waiting for its batch would "
     "time out first"),
])
def test_invalid_values_name_the_variable(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        Settings(_env_file=None)
    assert str(caught.value) == f"invalid settings: {message}"


def test_token_values_are_not_echoed_in_errors(monkeypatch):
    monkeypatch.setenv("GGA_READ_TOKEN", "x" * 3)
    monkeypatch.setenv("GGA_MAX_BATCH_ROWS", "0")
    with pytest.raises(SettingsError) as caught:
        Settings(_env_file=None)
    assert "xxx" not in str(caught.value)


def test_gga_alpha_sets_both_alphas_with_a_deprecation_warning(monkeypatch):
    monkeypatch.setenv("GGA_ALPHA", "0.1")
    with pytest.warns(DeprecationWarning, match="GGA_ALPHA is deprecated: it sets GGA_SERVE_ALPHA .* and "
                      "GGA_FIT_ALPHA"):
        s = Settings(_env_file=None)
    assert (s.model.alpha, s.fit.alpha) == (0.1, 0.1)
    monkeypatch.setenv("GGA_FIT_ALPHA", "0.2")  # a new name that is set wins
    with pytest.warns(DeprecationWarning):
        s = Settings(_env_file=None)
    assert (s.model.alpha, s.fit.alpha) == (0.1, 0.2)
    monkeypatch.delenv("GGA_ALPHA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Settings(_env_file=None)  # no warning without the old name
    assert (s.model.alpha, s.fit.alpha) == (None, 0.2)


def test_gga_serve_refuses_invalid_settings_with_the_message(monkeypatch, capsys):
    from service.cli import EXIT_BAD_SETTINGS, main

    monkeypatch.setenv("GGA_MAX_QUEUE_ROWS", "1")
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == EXIT_BAD_SETTINGS
    assert "gga-serve: invalid settings: GGA_MAX_QUEUE_ROWS (1) is below GGA_MAX_BATCH_ROWS (64)" in \
        capsys.readouterr().err
