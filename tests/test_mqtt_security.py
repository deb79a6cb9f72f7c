"""Telemetry and the collector through a broker that requires TLS and credentials, as docs/fleet-loop.md says:
a real Mosquitto on a free loopback port with a certificate from a CA made for the test and a password file;
the device side configured by `edgeship-device serve`'s flags, the collector by params.yaml's `fleet.broker`.
A client that does not trust the CA, speaks plain MQTT, or brings no or wrong credentials gets nothing in."""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import os
import ssl
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeship.cli.fleet import mqtt_settings
from edgeship.config import parse_params
from edgeship.device.serve import _broker, add_arguments
from edgeship.device.telemetry import WindowAggregator
from edgeship.device.telemetry_mqtt import TelemetryReporter, mqtt_client
from edgeship.device.telemetry_spool import Spool
from edgeship.fleet.broker import LocalBroker
from edgeship.fleet.collector import Collector
from edgeship.fleet.store import FleetStore
from edgeship.records.telemetry import DeviceIdentity

from timing import scaled, wait_until

USERS = {"collector": "c-" + uuid.uuid4().hex, "pi4-0001": "d-" + uuid.uuid4().hex}


def _certificate(subject: str, key, issuer: x509.Name, signer, ca: bool, ip: str | None = None) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def password_line(user: str, password: str) -> str:
    """A Mosquitto 2 password file line, as `mosquitto_passwd` writes it (PBKDF2-SHA512, 101 rounds)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@pytest.fixture
def secure_broker(tmp_path):
    """Mosquitto with TLS (a test CA's certificate for 127.0.0.1) and two users; the CA's path for clients."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeship test CA")])
    ca = _certificate("edgeship test CA", ca_key, ca_name, ca_key, ca=True)
    broker_cert = _certificate("127.0.0.1", key, ca_name, ca_key, ca=False, ip="127.0.0.1")
    ca_file = _pem(tmp_path / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    cert_file = _pem(tmp_path / "broker.pem", broker_cert.public_bytes(serialization.Encoding.PEM))
    key_file = _pem(tmp_path / "broker.key", key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    passwords = tmp_path / "passwords"
    passwords.write_text("".join(password_line(user, secret) + "\n" for user, secret in USERS.items()))
    with LocalBroker(certfile=cert_file, keyfile=key_file, password_file=passwords) as broker:
        yield broker, ca_file


def connack(settings, name: str):
    """What the broker answers a client of `settings`: its CONNACK reason, the error the client raised (a TLS
    handshake it refused), or None when the broker hung up without answering."""
    client = mqtt_client(settings, f"probe-{name}-{uuid.uuid4().hex[:6]}", reconnect=False)
    answers = []
    client.on_connect = lambda c, userdata, flags, reason, properties: answers.append(reason)
    try:
        client.connect(settings.host, settings.port, keepalive=5)
    except (ssl.SSLError, OSError) as error:
        return error
    deadline = time.monotonic() + scaled(10)
    while not answers and time.monotonic() < deadline:
        if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    client.disconnect()
    return answers[0] if answers else None


def test_telemetry_and_the_collector_through_tls_and_credentials(secure_broker, tmp_path, monkeypatch):
    broker, ca_file = secure_broker
    fleet = f"s{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("EDGESHIP_TEST_COLLECTOR_PASSWORD", USERS["collector"])
    monkeypatch.setenv("EDGESHIP_TEST_DEVICE_PASSWORD", USERS["pi4-0001"])
    params = parse_params({"fleet": {"name": fleet, "broker": {
        "host": "127.0.0.1", "port": broker.port, "tls": True, "ca_file": str(ca_file), "username": "collector",
        "password_env": "EDGESHIP_TEST_COLLECTOR_PASSWORD"}}})
    collecting = mqtt_settings(params)                                          # what `edgeship fleet collect` uses
    serve = argparse.ArgumentParser()
    add_arguments(serve)
    device = _broker(serve.parse_args([                                        # what `edgeship-device serve` uses
        "--state-dir", str(tmp_path / "device"), "--broker", f"127.0.0.1:{broker.port}", "--fleet", fleet, "--tls",
        "--ca-file", str(ca_file), "--username", "pi4-0001", "--password-env", "EDGESHIP_TEST_DEVICE_PASSWORD"]))

    store = FleetStore(f"sqlite:///{tmp_path}/fleet.db")
    with Collector(collecting, store, client_id=f"collector-{fleet}") as collector:
        assert collector.connected.wait(scaled(10))
        identity = DeviceIdentity(device_id="pi4-0001", model_name="digits", device_class="pi4")
        with TelemetryReporter(WindowAggregator(identity, progress_dir=tmp_path / "device"),
                               Spool(tmp_path / "device"), device, window_s=3600) as reporter:
            reporter.flush()
            wait_until(lambda: collector.stored >= 1, 20, "the device's record through TLS")
        wait_until(lambda: collector.stored >= 2, 20, "the last window, sent on close")
    assert store.count_records() == 2 and {r.device_id for r in store.records()} == {"pi4-0001"}
    store.close()

    # Nobody else gets in: a wrong password, no credentials, plain MQTT on the TLS port, a CA it does not trust
    monkeypatch.setenv("EDGESHIP_TEST_DEVICE_PASSWORD", "guessed")
    wrong = connack(device, "wrong-password")
    assert wrong is not None and not isinstance(wrong, Exception) and wrong.is_failure, wrong
    anonymous = connack(replace(device, username=None, password_env=None), "anonymous")
    assert anonymous is not None and not isinstance(anonymous, Exception) and anonymous.is_failure, anonymous
    monkeypatch.setenv("EDGESHIP_TEST_DEVICE_PASSWORD", USERS["pi4-0001"])
    assert not connack(device, "good").is_failure                               # the same client, right password
    assert connack(replace(device, tls=False), "plain") is None   # the broker hangs up on plain MQTT
    untrusted = connack(replace(device, ca_file=None), "untrusted")   # the system's CAs only
    assert isinstance(untrusted, ssl.SSLCertVerificationError), untrusted
