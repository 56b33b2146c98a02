"""config.json in both Greengrass v1 forms, the otaAgent block, AWS's keepalive rules, and a
clear ConfigError for each kind of bad input."""
from __future__ import annotations

import json

import pytest

import ggc_ota as g
from tests.cloud.device import make_root


@pytest.fixture(params=["current", "legacy"])
def root(request, cloud, thing, tmp_path):
    return make_root(tmp_path / "greengrass", thing, cloud.add_thing(thing), cloud.pki.ca_path, "localhost",
                     cloud.port, form=request.param)


def rewrite(root, change):
    doc = json.loads(root.config_path.read_text())
    change(doc)
    root.config_path.write_text(json.dumps(doc))


def test_both_forms_load_and_connect(root):
    cfg = g.load_config(str(root.root))
    assert cfg.thing_name == root.thing and cfg.iot_host == "localhost"
    assert cfg.cert_path.endswith(f"certs/{root.thing}.cert.pem") and cfg.ca_path.endswith("certs/root.ca.pem")
    assert cfg.keepalive == 600 and cfg.managed_respawn is True
    assert cfg.ota["stateDir"] == str(root.root / "ota-state") and cfg.ota["minFreeBytes"] == 400 * 1024 * 1024
    g.MqttClient(g.mqtt_settings(cfg), lambda t, p: None).check_connection()  # the paths are the right ones


@pytest.mark.parametrize("value,expected,warned", [(600, 600, False), (30, 30, False), (1200, 1200, False),
                                                    (5, 30, True), (7200, 1200, True)])
def test_keepalive_rules(root, value, expected, warned):
    rewrite(root, lambda d: d["coreThing"].update(keepAlive=value))
    cfg = g.load_config(str(root.root))
    assert cfg.keepalive == expected
    assert any("keepAlive" in w for w in cfg.warnings) == warned


def test_defaults_port_and_keepalive(root):
    rewrite(root, lambda d: (d["coreThing"].pop("iotMqttPort"), d["coreThing"].pop("keepAlive")))
    cfg = g.load_config(str(root.root))
    assert (cfg.port, cfg.keepalive) == (8883, 600)
    assert not g.mqtt_settings(cfg).wants_alpn()


def test_port_443_means_alpn(root):
    rewrite(root, lambda d: d["coreThing"].update(iotMqttPort=443))
    assert g.mqtt_settings(g.load_config(str(root.root))).wants_alpn()


def test_ota_agent_block(root):
    rewrite(root, lambda d: d.update(otaAgent={"stateDir": "/var/lib/ota", "scriptTimeout": 60,
                                                "keep": ["ggc/var"], "bogus": 1}))
    cfg = g.load_config(str(root.root))
    assert cfg.ota["stateDir"] == "/var/lib/ota" and cfg.ota["scriptTimeout"] == 60 and cfg.ota["keep"] == ["ggc/var"]
    assert cfg.unknown_keys == ["bogus"] and any("bogus" in w for w in cfg.warnings)


def test_a_typo_in_an_ota_agent_key_is_named_with_the_key_meant(root):
    """`scriptTimout` is ignored at run time (a warning at start) and fails --dry-run; both name
    the key that was probably meant."""
    rewrite(root, lambda d: d.update(otaAgent={"scriptTimout": 60}))
    cfg = g.load_config(str(root.root))
    assert cfg.unknown_keys == ["scriptTimout"] and cfg.ota["scriptTimeout"] == 300
    assert any("'scriptTimout' (did you mean scriptTimeout?)" in w for w in cfg.warnings), cfg.warnings
    config_line = g.preflight(str(root.root), None)[0]
    assert not config_line.ok and "did you mean scriptTimeout?" in config_line.message


@pytest.mark.parametrize("change,words", [
    (lambda d: d.pop("coreThing"), "coreThing is missing"),
    (lambda d: d["coreThing"].update(thingArn="not-an-arn"), "not a thing ARN"),
    (lambda d: d["coreThing"].pop("iotHost"), "iotHost is missing"),
    (lambda d: d["coreThing"].update(iotHost="h\r\nX-Evil: 1"), "must be a host name"),
    (lambda d: d["coreThing"].update(iotHost="host name"), "must be a host name"),
    (lambda d: d["coreThing"].update(iotHost=""), "must be a host name"),
    (lambda d: d["coreThing"].update(iotMqttPort="8883"), "iotMqttPort"),
    (lambda d: d["coreThing"].update(keepAlive=1.5), "keepAlive"),
    (lambda d: d.update(managedRespawn="yes"), "managedRespawn"),
    (lambda d: d.update(otaAgent={"scriptTimeout": "long"}), "otaAgent.scriptTimeout"),
    (lambda d: d.update(otaAgent={"keep": ["../etc"]}), "otaAgent.keep"),
    (lambda d: d.update(otaAgent={"minFreeBytes": -1}), "negative"),
    (lambda d: d.update(otaAgent={"reinstallSameVersion": "yes"}), "reinstallSameVersion must be of type bool"),
    (lambda d: d.update(otaAgent={"reinstallSameVersion": 1}), "reinstallSameVersion must be of type bool"),
    (lambda d: d.update(otaAgent={"scriptTimeout": True}), "otaAgent.scriptTimeout must be of type int/float"),
    (lambda d: d.update(otaAgent=[]), "otaAgent must be an object"),
])
def test_bad_config_is_a_clear_error(root, change, words):
    rewrite(root, change)
    with pytest.raises(g.ConfigError) as err:
        g.load_config(str(root.root))
    assert words in str(err.value) and err.value.reason == "CONFIG_INVALID"


def test_pkcs11_is_not_supported(cloud, thing, tmp_path):
    root = make_root(tmp_path / "gg", thing, cloud.add_thing(thing), cloud.pki.ca_path, "localhost", cloud.port)
    rewrite(root, lambda d: d["crypto"]["principals"]["IoTCertificate"].update(
        privateKeyPath="pkcs11:object=CoreKey;type=private"))
    with pytest.raises(g.ConfigError, match="PKCS#11"):
        g.load_config(str(root.root))


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(g.ConfigError, match="does not exist"):
        g.load_config(str(tmp_path))
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.json").write_text("{oops")
    with pytest.raises(g.ConfigError, match="not valid JSON"):
        g.load_config(str(tmp_path))
    (tmp_path / "config/config.json").write_text("[]")
    with pytest.raises(g.ConfigError, match="JSON object"):
        g.load_config(str(tmp_path))


@pytest.mark.parametrize("exe,root", [("/greengrass/ota/ota_agent/ggc-ota", "/greengrass"),
                                      ("/opt/gg/ota/ota_agent/ggc-ota", "/opt/gg"),
                                      ("/usr/local/bin/ggc-ota", "/greengrass")])
def test_default_root(exe, root):
    assert g.default_root(exe) == root


def test_a_thing_arn_with_a_trailing_newline_is_refused(tmp_path):
    import json
    cfg = {"coreThing": {"thingArn": "arn:aws:iot:us-east-1:123456789012:thing/core\n", "iotHost": "h",
                         "caPath": "ca", "certPath": "c", "keyPath": "k"}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.json").write_text(json.dumps(cfg))
    with pytest.raises(g.ConfigError, match="not a thing ARN"):
        g.load_config(str(tmp_path))


def test_proxy_from_the_greengrass_block_and_the_environment():
    core = {"networkProxy": {"noProxyAddresses": "http://128.12.34.56,www.example.com, .corp:8080",
                             "proxy": {"url": "http://proxy.site:1100", "username": "u", "password": "p@ss"}}}
    proxy = g.load_proxy(core, {})
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username, proxy.password) == \
        ("http", "proxy.site", 1100, "u", "p@ss")
    assert proxy.shown() == "http://u:***@proxy.site:1100" and "p@ss" not in repr(proxy.shown())
    assert not proxy.used_for("128.12.34.56") and not proxy.used_for("WWW.example.com")
    assert not proxy.used_for("a.corp") and proxy.used_for("iot.amazonaws.com")
    env = g.load_proxy({}, {"https_proxy": "http://user:pw@10.0.0.1:3128", "NO_PROXY": "*"})
    assert (env.username, env.password, env.port, env.source) == ("user", "pw", 3128, "HTTPS_PROXY")
    assert not env.used_for("anything")
    assert g.load_proxy({}, {}) is None
    tls = g.load_proxy({"networkProxy": {"proxy": {"url": "https://tls-proxy"}}}, {})
    assert (tls.scheme, tls.host, tls.port) == ("https", "tls-proxy", 443)
    for bad in ({"networkProxy": {"proxy": {"url": "ftp://x"}}}, {"networkProxy": {"proxy": {"url": "http://h:99999"}}},
                {"networkProxy": "http://x"}, {"networkProxy": {"proxy": {}}}):
        with pytest.raises(g.ConfigError):
            g.load_proxy(bad, {})


def test_the_client_id_is_the_thing_name_with_ota_unless_set(tmp_path):
    import json
    cfg = {"coreThing": {"thingArn": "arn:aws:iot:us-east-1:123456789012:thing/core", "iotHost": "h",
                         "caPath": "ca", "certPath": "c", "keyPath": "k"}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.json").write_text(json.dumps(cfg))
    settings = g.mqtt_settings(g.load_config(str(tmp_path)))
    assert settings.client_id == "core-ota"
    assert (settings.backoff_base, settings.backoff_cap) == (10.0, 120.0)  # a fleet's reconnects spread over 10 s
    cfg["otaAgent"] = {"clientId": "core"}
    (tmp_path / "config/config.json").write_text(json.dumps(cfg))
    assert g.mqtt_settings(g.load_config(str(tmp_path))).client_id == "core"
    cfg["otaAgent"] = {"clientId": "bad\nid"}
    (tmp_path / "config/config.json").write_text(json.dumps(cfg))
    with pytest.raises(g.ConfigError, match="clientId"):
        g.load_config(str(tmp_path))


@pytest.mark.parametrize("url", ["http://user:S3cr/et@proxy:3128", "http://user:S3cr?et@proxy:3128",
                                 "http://user:S3cr#et@proxy:3128", "http://user:1234#et@proxy:3128"])
def test_a_proxy_password_with_an_unescaped_character_is_an_error_that_never_shows_it(url):
    with pytest.raises(g.ConfigError) as err:
        g.parse_proxy(url, None, None, None, "coreThing.networkProxy.proxy.url")
    assert "S3cr" not in str(err.value) and "1234" not in str(err.value) and "percent-encoded" in str(err.value)


def test_a_percent_encoded_proxy_password_is_read():
    proxy = g.parse_proxy("http://user:S3cr%2Fet%23%40@proxy:3128", None, None, None, "test")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == ("proxy", 3128, "user", "S3cr/et#@")
    assert "S3cr" not in proxy.shown()


@pytest.mark.parametrize("problem, words", [
    ("missing-cert", "the certificate file {cert} does not exist"),
    ("garbage-cert", "the certificate file {cert} holds no PEM certificate"),
    ("garbage-key", "the private key file {key} holds no PEM private key"),
    ("other-key", "the private key {key} does not belong to the certificate {cert}"),
])
def test_credentials_that_do_not_load_say_which_file_and_why(cloud, tmp_path, problem, words):
    """Where the TLS library says "[SSL] PEM lib" or "no certificate assigned", the agent names the
    file and what is wrong with it."""
    settings = g.MqttSettings(host="localhost", port=8883, client_id="c", ca_path=str(cloud.pki.ca_path),
                              cert_path=str(tmp_path / "c.pem"), key_path=str(tmp_path / "k.pem"))
    mine, other = cloud.pki.client("cred-a"), cloud.pki.client("cred-b")
    (tmp_path / "c.pem").write_bytes(mine.cert.read_bytes())
    (tmp_path / "k.pem").write_bytes((other if problem == "other-key" else mine).key.read_bytes())
    if problem == "missing-cert":
        (tmp_path / "c.pem").unlink()
    if problem == "garbage-cert":
        (tmp_path / "c.pem").write_text("not a certificate\n")
    if problem == "garbage-key":
        (tmp_path / "k.pem").write_text("-----BEGIN NOTHING-----\n")
    with pytest.raises(g.CredentialsInvalid) as err:
        g.tls_context(settings)
    assert words.format(cert=tmp_path / "c.pem", key=tmp_path / "k.pem") in str(err.value), str(err.value)
    assert err.value.reason == "CONFIG_INVALID"
