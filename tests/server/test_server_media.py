"""Image URLs as the server takes them (gmaivl_rt.server.media): sizes checked before decoding, base64 decoded
strictly (line-wrapped allowed), file:// confined to the allowed folder (links out of it too), http(s) refused by
default, and errors that name the image by role without quoting the URL."""
from __future__ import annotations

import base64

import pytest

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.server.media import decoded_size, read_image_url

SECRET = "Quixote^Dulcinea"


def read(url, **kwargs):
    return read_image_url(url, role="image 2", max_bytes=kwargs.pop("max_bytes", 1000), **kwargs)


def test_data_uris_decode_to_their_bytes():
    data = bytes(range(256)) * 3
    encoded = base64.b64encode(data).decode()
    assert read(f"data:application/dicom;base64,{encoded}") == data
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME-style lines
    assert read(f"data:image/png;base64,{wrapped}") == data
    assert read(f"data:application/octet-stream;name=x.dcm;base64,{encoded}") == data


def test_the_size_is_refused_before_anything_is_decoded():
    # 2000 characters of invalid base64: a decoder would say "not base64"; the size check answers first
    with pytest.raises(LimitError, match="image 2: .*over the limit of 1000 bytes"):
        read("data:image/png;base64," + "@" * 2000)
    assert decoded_size(4) == 3 and decoded_size(1336) == 1002
    payload = base64.b64encode(b"x" * 1001).decode()  # within the bound's slack, over the limit once decoded
    with pytest.raises(LimitError, match="1001 bytes"):
        read(f"data:image/png;base64,{payload}")


@pytest.mark.parametrize("url, words", [
    (f"data:image/png;base64,{SECRET}!!", "not valid base64"),
    (f"data:image/png,{SECRET}", "base64-encoded"),
    (f"data:text/plain;base64,{base64.b64encode(SECRET.encode()).decode()}", "media type"),
    (f"data:;base64,{base64.b64encode(SECRET.encode()).decode()}", "media type"),
    ("data:image/png;base64,", "no bytes"),
    (f"http://127.0.0.1:9/{SECRET}.png", "refused"),
    (f"https://example.org/{SECRET}.dcm", "refused"),
    (f"ftp://host/{SECRET}.dcm", "scheme"),
    (f"/srv/{SECRET}.dcm", "scheme"),
    (f"file:///srv/{SECRET}.dcm", "allowed-local-media-path"),
])
def test_bad_urls_are_input_errors_naming_the_role_not_the_url(url, words):
    with pytest.raises(InputError) as caught:
        read(url)
    message = str(caught.value)
    assert message.startswith("image 2: ") and words in message
    assert SECRET not in message and len(message) <= 300


def test_file_urls_stay_inside_the_allowed_folder(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "scan.dcm").write_bytes(b"x" * 10)
    (outside / f"{SECRET}.dcm").write_bytes(b"y" * 10)
    (allowed / "link.dcm").symlink_to(outside / f"{SECRET}.dcm")
    (allowed / "big.dcm").write_bytes(b"z" * 2000)
    assert read((allowed / "scan.dcm").as_uri(), allowed_local_media_path=allowed) == allowed / "scan.dcm"
    for path in (outside / f"{SECRET}.dcm", allowed / "link.dcm", allowed / ".." / "outside" / f"{SECRET}.dcm"):
        with pytest.raises(InputError, match="outside the server's allowed local media path") as caught:
            read("file://" + str(path), allowed_local_media_path=allowed)
        assert SECRET not in str(caught.value)
    with pytest.raises(InputError, match="no host"):
        read(f"file://otherhost{allowed / 'scan.dcm'}", allowed_local_media_path=allowed)
    with pytest.raises(InputError, match="names no file"):
        read((allowed / "missing.dcm").as_uri(), allowed_local_media_path=allowed)
    with pytest.raises(LimitError, match="2000 bytes"):
        read((allowed / "big.dcm").as_uri(), allowed_local_media_path=allowed)
