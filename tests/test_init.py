"""The init-system files: the systemd unit (systemd-analyze verify) and the OpenWrt procd
script (shellcheck, busybox ash, and its start_service run with stand-ins for procd's helpers)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

UNIT = REPO / "systemd/ggc-ota.service"
PROCD = REPO / "openwrt/ggc-ota"


def test_unit_has_r18_settings():
    text = UNIT.read_text()
    for line in ("Type=forking", "Restart=on-failure", "ExecStart=/greengrass/ota/ota_agent/ggc-ota",
                 "PIDFile=/greengrass/ota-state/ggc-ota.pid", "KillMode=process", "RuntimeDirectory=ggc-ota",
                 "Environment=TMPDIR=/run/ggc-ota", "StartLimitBurst=5"):
        assert line in text.splitlines()
    assert any(line.startswith("Documentation=https://") for line in text.splitlines())


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    agent = tmp_path / "greengrass/ota/ota_agent/ggc-ota"
    agent.parent.mkdir(parents=True)
    shutil.copy(REPO / "ggc_ota.py", agent)
    agent.chmod(0o755)
    unit = tmp_path / "ggc-ota.service"
    unit.write_text(UNIT.read_text().replace("/greengrass/", f"{tmp_path}/greengrass/"))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "ggc-ota.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_procd_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run([shellcheck, "-s", "sh", str(PROCD)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def busybox():
    path = shutil.which("busybox")
    if path is None:
        pytest.skip("busybox is not installed")
    return path


def test_procd_script_parses_under_busybox_ash():
    out = subprocess.run([busybox(), "ash", "-n", str(PROCD)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


STANDINS = r'''
# stand-ins for OpenWrt's /lib/functions.sh and procd.sh: uci settings come from UCI_<option>
uci_load_validate() {  # package type section callback spec...: as procd.sh, with validate_data's checks
    _section="$3"; _callback="$4"; shift 4; _result=0
    echo "validate $*" >> "$OUT"
    for _spec in "$@"; do
        _name=${_spec%%:*}; _rest=${_spec#*:}; _type=${_rest%%:*}; _default=${_rest#*:}
        [ "$_default" = "$_rest" ] && _default=""
        eval "_v=\${UCI_$_name-\$_default}"
        case "$_type" in
            bool) case "$_v" in 1|on|true|yes|enabled) _v=1;; 0|off|false|no|disabled) _v=0;; *) _result=1;; esac ;;
            directory) [ -d "$_v" ] || _result=1 ;;
            or\(*) case "$_type" in *"\"$_v\""*) ;; *) _result=1;; esac ;;
        esac
        eval "$_name=\$_v"
    done
    "$_callback" "$_section" "$_result"
}
logger() { echo "logger $*" >> "$OUT"; }
procd_open_instance() { echo "open $*" >> "$OUT"; }
procd_set_param() { echo "param $*" >> "$OUT"; }
procd_close_instance() { echo "close" >> "$OUT"; }
'''


def start_service(tmp_path, **uci) -> tuple:
    """start_service under BusyBox with these uci settings: (its exit code, stderr, what it did).
    root defaults to an existing directory (the validator checks that it exists); the defaults
    themselves are in the `validate` line."""
    if "root" not in uci:
        (tmp_path / "greengrass").mkdir(exist_ok=True)
        uci["root"] = str(tmp_path / "greengrass")
    out = tmp_path / "params"
    script = f"{STANDINS}\n. {PROCD}\nstart_service\n"
    env = {"OUT": str(out), "PATH": "/usr/bin:/bin"} | {f"UCI_{k}": v for k, v in uci.items()}
    done = subprocess.run([busybox(), "ash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
    return done.returncode, done.stderr, out.read_text().splitlines() if out.exists() else []


def run_start_service(tmp_path, **uci) -> list:
    code, stderr, lines = start_service(tmp_path, **uci)
    assert code == 0, stderr
    return lines


def test_procd_start_service_defaults(tmp_path):
    lines = run_start_service(tmp_path)
    assert lines[0].split()[1:4] == ["enabled:bool:1", "root:directory:/greengrass", "tmpdir:directory:/tmp"]
    assert lines[0].split()[4].startswith("log_level:or(") and lines[0].endswith(":INFO")
    assert lines[1] == "open ggc-ota" and lines[-1] == "close"
    params = {line.split()[1]: " ".join(line.split()[2:]) for line in lines if line.startswith("param ")}
    root = tmp_path / "greengrass"
    assert params["command"] == f"{root}/ota/ota_agent/ggc-ota --root {root} --foreground --log-level INFO"
    assert params["env"] == "TMPDIR=/tmp" and params["respawn"] == "60 5 5"
    assert params["stderr"] == "1" and "stdout" not in params
    assert int(params["term_timeout"]) >= 300


def test_procd_start_service_uci_settings(tmp_path):
    (tmp_path / "gg").mkdir()
    (tmp_path / "tmp").mkdir()
    lines = run_start_service(tmp_path, root=f"{tmp_path}/gg", tmpdir=f"{tmp_path}/tmp", log_level="debug")
    params = {line.split()[1]: " ".join(line.split()[2:]) for line in lines if line.startswith("param ")}
    root = f"{tmp_path}/gg"
    assert params["command"] == f"{root}/ota/ota_agent/ggc-ota --root {root} --foreground --log-level debug"
    assert params["env"] == f"TMPDIR={tmp_path}/tmp"


@pytest.mark.parametrize("setting", [{"enabled": "maybe"}, {"root": "/no/such/root"}, {"tmpdir": "/no/such/tmp"},
                                     {"log_level": "LOUD"}])
def test_procd_a_setting_that_fails_its_check_stops_the_start_with_a_message(tmp_path, setting):
    """Every setting is checked as procd's validate_data would (uci_load_validate): a bad one
    starts nothing, says which file and what each setting must be, and reaches logread."""
    code, stderr, lines = start_service(tmp_path, **setting)
    assert code != 0 and not any(line.startswith("open") for line in lines), lines
    assert "/etc/config/ggc-ota" in stderr and "not starting" in stderr
    assert any(line.startswith("logger -t ggc-ota -p daemon.err") for line in lines)


def test_procd_service_triggers_and_config_file(tmp_path):
    lines = run_start_service(tmp_path)
    params = {line.split()[1]: " ".join(line.split()[2:]) for line in lines if line.startswith("param ")}
    assert params["file"] == f"{tmp_path}/greengrass/config/config.json"
    out = tmp_path / "triggers"
    script = (f"procd_add_reload_trigger() {{ echo \"reload $*\" >> {out}; }}\n"
              f"procd_add_validation() {{ echo \"validation $*\" >> {out}; }}\n. {PROCD}\nservice_triggers\n")
    done = subprocess.run([busybox(), "ash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines() == ["reload ggc-ota", "validation validate_ggc_ota_section"]


@pytest.mark.parametrize("word, starts", [("0", False), ("no", False), ("off", False), ("false", False),
                                         ("1", True), ("yes", True), ("on", True), ("true", True)])
def test_procd_enabled_takes_every_word_uci_takes(tmp_path, word, starts):
    """`enabled` was compared with `= 1`: `yes`, `on` or `true` silently disabled the service."""
    lines = run_start_service(tmp_path, enabled=word)
    assert any(line.startswith("open") for line in lines) == starts, lines


def test_the_uci_file_parses_and_names_what_the_script_reads():
    text = (REPO / "openwrt/ggc-ota.config").read_text()
    assert "config ggc-ota 'main'" in text
    for option in ("enabled", "root", "tmpdir", "log_level"):
        assert f"option {option} " in text


def test_build_sh_and_ci_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run([shellcheck, str(REPO / "build.sh"), str(REPO / ".ci/run")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_build_sh_cloud_without_a_directory_is_a_usage_error():
    out = subprocess.run([str(REPO / "build.sh"), "cloud"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage: ./build.sh cloud DIR" in out.stderr and "Traceback" not in out.stderr
