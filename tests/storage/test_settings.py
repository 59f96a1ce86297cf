"""Choosing the blob store from LASAGNE_ENGINE_BLOB_URL, the S3 variables and the config file."""

import pytest

from lasagne_engine.blobstore import LocalBlobStore, S3BlobStore, configured_blob_store, open_blob_store
from lasagne_engine.blobstore.s3 import DEFAULT_PART_BYTES
from lasagne_engine.blobstore.settings import _read_settings

from .s3_server import ACCESS_KEY, SECRET_KEY


def s3_store(environ) -> S3BlobStore:
    """Open the store ``environ`` names, without contacting it."""
    store = open_blob_store(environ["LASAGNE_ENGINE_BLOB_URL"], settings=_read_settings(None, environ))
    assert isinstance(store, S3BlobStore)
    return store


def test_no_url_keeps_local_default():
    assert configured_blob_store(None, environ={}) is None


def test_local_urls(tmp_path):
    assert isinstance(open_blob_store(f"file://{tmp_path}/a"), LocalBlobStore)
    assert open_blob_store(tmp_path / "b").root == (tmp_path / "b").resolve()


def test_unknown_scheme():
    with pytest.raises(ValueError, match=r"No blob store backend for scheme 'gs' in 'gs://b/p'; use s3://"):
        open_blob_store("gs://b/p")


class TestS3Settings:
    def test_bucket_prefix_endpoint(self):
        store = s3_store(
            {
                "LASAGNE_ENGINE_BLOB_URL": "s3://models/team/a/",
                "LASAGNE_ENGINE_S3_ENDPOINT": "127.0.0.1:1",
                "LASAGNE_ENGINE_S3_SECURE": "false",
            }
        )

        assert store.location.bucket == "models"
        assert store.location.prefix == "team/a/"
        assert store.location.endpoint == "127.0.0.1:1"
        assert store.location.secure is False
        assert store.part_bytes == DEFAULT_PART_BYTES

    def test_endpoint_url_sets_tls(self):
        plain = s3_store({"LASAGNE_ENGINE_BLOB_URL": "s3://models", "LASAGNE_ENGINE_S3_ENDPOINT": "http://minio:9000"})
        secure = s3_store({"LASAGNE_ENGINE_BLOB_URL": "s3://models", "LASAGNE_ENGINE_S3_ENDPOINT": "https://minio:9000"})

        assert (plain.location.endpoint, plain.location.secure, plain.location.prefix) == ("minio:9000", False, "")
        assert (secure.location.endpoint, secure.location.secure) == ("minio:9000", True)

    def test_part_size_and_region(self):
        store = s3_store(
            {"LASAGNE_ENGINE_BLOB_URL": "s3://models", "LASAGNE_ENGINE_S3_PART_BYTES": str(8 << 20), "AWS_REGION": "eu-west-1"}
        )

        assert store.part_bytes == 8 << 20
        assert store.location.region == "eu-west-1"

    @pytest.mark.parametrize("part_bytes", [str(1 << 20), str(6 << 30)])
    def test_part_size_outside_s3_limits(self, part_bytes):
        with pytest.raises(ValueError, match=rf"LASAGNE_ENGINE_S3_PART_BYTES={part_bytes} is outside .* \(5 MiB\) to"):
            s3_store({"LASAGNE_ENGINE_BLOB_URL": "s3://models", "LASAGNE_ENGINE_S3_PART_BYTES": part_bytes})

    @pytest.mark.parametrize("url", ["s3://", "s3://Upper/p", "s3://ab"])
    def test_invalid_bucket(self, url):
        with pytest.raises(ValueError, match="Invalid bucket"):
            s3_store({"LASAGNE_ENGINE_BLOB_URL": url})

    def test_invalid_secure(self):
        with pytest.raises(ValueError, match=r"LASAGNE_ENGINE_S3_SECURE='maybe' is not a boolean"):
            s3_store({"LASAGNE_ENGINE_BLOB_URL": "s3://models", "LASAGNE_ENGINE_S3_SECURE": "maybe"})

    def test_half_credentials(self):
        with pytest.raises(ValueError, match="Only half of the S3 credentials are set"):
            open_blob_store("s3://models", settings={"endpoint": "127.0.0.1:1", "access_key": "only-the-key"})

    @pytest.mark.parametrize(
        ("environ", "expected_key"),
        [
            ({"AWS_ACCESS_KEY_ID": "aws", "AWS_SECRET_ACCESS_KEY": "aws-secret"}, "aws"),
            ({"MINIO_ROOT_USER": "minio", "MINIO_ROOT_PASSWORD": "minio-secret"}, "minio"),
            (
                {"AWS_ACCESS_KEY_ID": "aws", "MINIO_ROOT_USER": "minio", "MINIO_ROOT_PASSWORD": "minio-secret"},
                "minio",
            ),
        ],
    )
    def test_credentials_from_one_pair(self, environ, expected_key):
        store = s3_store({"LASAGNE_ENGINE_BLOB_URL": "s3://models", **environ})

        assert store.client._provider.retrieve().access_key == expected_key


class TestConfigFile:
    def test_table_read_and_environment_wins(self, tmp_path, s3_server):
        config = tmp_path / "config.toml"
        config.write_text(
            "[server]\nread_write_tokens = []\n\n"
            "[blob_store]\n"
            'url = "s3://from-file/prefix"\n'
            f'endpoint = "http://{s3_server.endpoint}"\n'
            'access_key = "file-key"\n'
            'secret_key = "file-secret"\n'
            "part_bytes = 6291456\n"
        )

        from_file = configured_blob_store(config, environ={})
        overridden = configured_blob_store(config, environ={"LASAGNE_ENGINE_BLOB_URL": "s3://from-env"})

        assert from_file.location.url == "s3://from-file/prefix/"
        assert from_file.location.endpoint == s3_server.endpoint
        assert from_file.location.secure is False
        assert from_file.part_bytes == 6 << 20
        assert from_file.client._provider.retrieve().access_key == "file-key"
        assert overridden.location.bucket == "from-env"

    def test_missing_file_reads_as_empty(self, tmp_path):
        assert configured_blob_store(tmp_path / "absent.toml", environ={}) is None

    def test_bucket_created(self, s3_server):
        environ = {
            "LASAGNE_ENGINE_BLOB_URL": "s3://created-at-start",
            "LASAGNE_ENGINE_S3_ENDPOINT": f"http://{s3_server.endpoint}",
            "MINIO_ROOT_USER": ACCESS_KEY,
            "MINIO_ROOT_PASSWORD": SECRET_KEY,
        }

        store = configured_blob_store(None, environ=environ)


        assert store.client.bucket_exists("created-at-start")
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"
        store.close()

    def test_unknown_key(self, tmp_path):
        config = tmp_path / "config.toml"
        config.write_text('[blob_store]\nurl = "s3://b-1"\nbucket = "x"\n')

        with pytest.raises(ValueError, match=r"unknown keys \['bucket'\] in \[blob_store\]"):
            configured_blob_store(config, environ={})
