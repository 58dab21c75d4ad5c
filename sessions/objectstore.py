"""An S3-compatible bucket (boto3, SigV4): objects under a prefix, multipart uploads that can be resumed.

Every failure becomes :class:`StorageError` naming the endpoint, bucket and object and saying what to do; the
secret key is handed to boto3 once and never appears in a message, a repr or a log line.

boto3 >= 1.36 adds CRC32 checksum trailers to uploads by default ("when_supported") and streams them with
aws-chunked encoding, which S3-compatible servers (Swift's s3api, older Ceph) refuse or store wrongly; both
switches are set to "when_required". Integrity is ours instead: Content-MD5 on every part (the server refuses
a part whose bytes differ), the part ETags compared with the local MD5s, and a read-back SHA-256 of the whole
object (see :mod:`broker.archive`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from medcore.errors import StorageError

__all__ = ["ObjectStore", "ObjectInfo", "sha256_file", "CHUNK"]

CHUNK = 1 << 20
SHA_META = "sha256"  # x-amz-meta-sha256: the SHA-256 of the whole object, as medbroker computed it locally


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD says about an object."""

    key: str
    size: int
    etag: str
    sha256: str | None  # our metadata; None on objects medbroker did not write


def sha256_file(path: Path | str) -> tuple[str, int]:
    """``(hex SHA-256, size)`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


class ObjectStore:
    """One bucket and prefix of an S3-compatible service; object names are ``prefix + key``."""

    def __init__(self, *, bucket: str, prefix: str, endpoint: str, region: str, access_key: str, secret_key: str,
                 timeout: float = 30.0) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint or f"https://s3.{region}.amazonaws.com"
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, region_name=region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          # bounded: a dead endpoint fails this pass quickly; the next pass resumes
                          retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=timeout,
                          read_timeout=timeout, tcp_keepalive=True))

    def __repr__(self) -> str:
        return f"ObjectStore(s3://{self.bucket}/{self.prefix} at {self.endpoint})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def name(self, key: str) -> str:
        """The object name of a recording key."""
        return self.prefix + key

    # ------------------------------------------------------------------ errors
    def _error(self, exc: Exception, what: str, key: str | None = None) -> StorageError:
        from botocore.exceptions import ClientError

        where = f"s3://{self.bucket}/{self.name(key) if key is not None else self.prefix} at {self.endpoint}"
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            detail = f"{code} (HTTP {status})"
            hint = {"AccessDenied": "check [archive] access_key_file/secret_key_file and the bucket's policy",
                    "InvalidAccessKeyId": "check [archive] access_key_file",
                    "SignatureDoesNotMatch": "check [archive] secret_key_file and region",
                    "NoSuchBucket": "create the bucket, or fix [archive] url"}.get(
                code, "check the object store's logs; the next pass retries")
        else:
            detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            hint = "is the object store up and [archive] endpoint right? the next pass resumes where this stopped"
        return StorageError(f"object store: {what} {where} failed: {detail[:300]}", hint)

    @staticmethod
    def _code(exc: Exception) -> str:
        from botocore.exceptions import ClientError

        return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""

    # ------------------------------------------------------------------ reading
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and recorded SHA-256, or None when there is none.

        :raises StorageError: the store cannot be asked
        """
        try:
            r = self._client.head_object(Bucket=self.bucket, Key=self.name(key))
        except Exception as exc:  # noqa: BLE001 - translated below
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(exc, "looking up", key) from exc
        return ObjectInfo(key, int(r["ContentLength"]), str(r.get("ETag", "")).strip('"'),
                          (r.get("Metadata") or {}).get(SHA_META))

    def stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks (a full GET).

        :raises StorageError: missing or unreadable
        """
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self.name(key))["Body"]
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "reading", key) from exc
        try:
            while block := body.read(CHUNK):
                yield block
        except Exception as exc:  # noqa: BLE001 - a connection dropped mid-body
            raise self._error(exc, "reading", key) from exc
        finally:
            body.close()

    def read_back(self, key: str) -> tuple[str, int]:
        """``(hex SHA-256, size)`` of the object as the store serves it now."""
        h = hashlib.sha256()
        size = 0
        for block in self.stream(key):
            h.update(block)
            size += len(block)
        return h.hexdigest(), size

    def download(self, key: str, dest: Path) -> tuple[str, int]:
        """Write the object to ``dest`` (complete or absent: a temporary file renamed at the end).

        :returns: ``(hex SHA-256, size)`` of what was written
        """
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")  # readers on two threads
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for block in self.stream(key):
                    fh.write(block)
                    h.update(block)
                    size += len(block)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return h.hexdigest(), size

    def keys(self) -> Iterator[str]:
        """Every key under the prefix (the prefix taken off), in the store's (lexical) order."""
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                args["ContinuationToken"] = token
            try:
                page = self._client.list_objects_v2(**args)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, "listing") from exc
            for obj in page.get("Contents", ()):
                yield obj["Key"][len(self.prefix):]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def probe(self) -> int:
        """Check the bucket can be listed with these keys; returns how many keys the first page under the
        prefix holds (at most 1000).

        :raises StorageError: unreachable, refused, or no such bucket
        """
        try:
            page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1000)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "listing") from exc
        return int(page.get("KeyCount", len(page.get("Contents", ()))))

    # ------------------------------------------------------------------ writing
    def start_upload(self, key: str, sha256: str) -> str:
        """Begin a multipart upload whose object will carry ``sha256`` as metadata; returns its upload id."""
        try:
            r = self._client.create_multipart_upload(Bucket=self.bucket, Key=self.name(key),
                                                     Metadata={SHA_META: sha256},
                                                     ContentType="application/octet-stream")
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "starting an upload to", key) from exc
        return str(r["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Store one part (Content-MD5 set: the server refuses altered bytes); returns its ETag (hex MD5).

        :raises StorageError: refused, or the ETag is not the part's MD5 (the server stored something else)
        """
        md5 = hashlib.md5(data, usedforsecurity=False)
        try:
            r = self._client.upload_part(Bucket=self.bucket, Key=self.name(key), UploadId=upload_id,
                                         PartNumber=number, Body=data,
                                         ContentMD5=base64.b64encode(md5.digest()).decode())
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"uploading part {number} of", key) from exc
        etag = str(r.get("ETag", "")).strip('"')
        if etag.lower() != md5.hexdigest():
            raise StorageError(f"object store: part {number} of s3://{self.bucket}/{self.name(key)} came back with "
                               f"ETag {etag[:80]!r}, not the MD5 of what was sent ({md5.hexdigest()})",
                               "the store altered or mislabelled the part; the upload is retried from scratch")
        return etag

    def stored_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """``{part number: (etag, size)}`` the store holds for an upload, or None when the upload is gone."""
        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                r = self._client.list_parts(Bucket=self.bucket, Key=self.name(key), UploadId=upload_id,
                                            PartNumberMarker=marker)
            except Exception as exc:  # noqa: BLE001
                if self._code(exc) in ("NoSuchUpload", "404"):
                    return None
                raise self._error(exc, "listing the parts of", key) from exc
            for p in r.get("Parts", ()):
                parts[int(p["PartNumber"])] = (str(p["ETag"]).strip('"'), int(p["Size"]))
            if not r.get("IsTruncated"):
                return parts
            marker = int(r.get("NextPartNumberMarker") or 0)

    def complete_upload(self, key: str, upload_id: str, etags: list[str]) -> str:
        """Join parts 1..N into the object; returns its ETag."""
        try:
            r = self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.name(key), UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": f'"{e}"'} for n, e in enumerate(etags, 1)]})
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "completing the upload of", key) from exc
        return str(r.get("ETag", "")).strip('"')

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Drop an upload's parts (best effort: an upload that is already gone is fine)."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.name(key), UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001
            if self._code(exc) not in ("NoSuchUpload", "404"):
                raise self._error(exc, "aborting the upload of", key) from exc

    def put_file(self, key: str, path: Path, sha256: str, part_size: int) -> None:
        """Replace the object by a file in one go (multipart above ``part_size``); no resume (retention's
        redacted replacements are small and re-run from the start)."""
        size = os.path.getsize(path)
        if size <= part_size:
            data = Path(path).read_bytes()
            try:
                self._client.put_object(Bucket=self.bucket, Key=self.name(key), Body=data, Metadata={SHA_META: sha256},
                                        ContentMD5=base64.b64encode(hashlib.md5(
                                            data, usedforsecurity=False).digest()).decode())
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, "replacing", key) from exc
            return
        upload_id = self.start_upload(key, sha256)
        try:
            etags = []
            with open(path, "rb") as fh:
                for number in range(1, -(-size // part_size) + 1):
                    etags.append(self.upload_part(key, upload_id, number, fh.read(part_size)))
            self.complete_upload(key, upload_id, etags)
        except BaseException:
            try:
                self.abort_upload(key, upload_id)
            except StorageError:
                pass
            raise

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.name(key))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "deleting", key) from exc


def read_part(fh: BinaryIO, number: int, part_size: int) -> bytes:
    """Part ``number`` (1-based) of an open file."""
    fh.seek((number - 1) * part_size)
    return fh.read(part_size)
