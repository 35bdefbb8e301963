"""The demo's held-out benchmark: built only from shipped files the demo's training data leaves out, in
VLMEvalKit TSV form that the eval reader takes back (image reuse by index included)."""
import collections

from gmaivl_rt.data.sources import DEMO_DICOM_FILES, DEMO_NIFTI_FILES
from gmaivl_rt.eval import demo
from gmaivl_rt.eval.readers import Base64Image, read_benchmark


def test_demo_benchmark_is_held_out_and_reads_back(tmp_path, monkeypatch):
    used = []
    original = demo.held_out_pictures

    def recording():
        import gmaivl_rt.medical.reader as medical_reader

        real = medical_reader.read_medical_image

        def read(path, *args, **kwargs):
            used.append(str(path).rsplit("/", 1)[-1])
            return real(path, *args, **kwargs)

        monkeypatch.setattr(medical_reader, "read_medical_image", read)
        return original()

    monkeypatch.setattr(demo, "held_out_pictures", recording)
    path = demo.build_demo_benchmark(tmp_path / "demo.tsv")
    assert used and not set(used) & (set(DEMO_DICOM_FILES) | set(DEMO_NIFTI_FILES))
    bench = read_benchmark(path)
    assert (bench.format, bench.protocol) == ("vlmevalkit", "mcq")
    items = bench.items
    assert all(len(i.options) == 4 and i.answer in i.options for i in items)
    assert all(i.options[i.answer] in demo.PLANES + demo.MODALITIES for i in items)
    assert {i.groups["category"] for i in items} == {"plane", "modality"}
    # a picture asked about twice: the second row reuses the first row's image through its index
    raw = [line.split("\t") for line in path.read_text().splitlines()]
    header = raw[0]
    reused = [row for row in raw[1:] if len(row[header.index("image")]) <= 64]
    assert reused
    by_index = {i.index: i for i in items}
    for row in reused:
        assert by_index[row[0]].images == by_index[row[header.index("image")]].images
        assert isinstance(by_index[row[0]].images[0], Base64Image)
    # answers are spread over the letters, not all "A"
    assert len(collections.Counter(i.answer for i in items)) == 4
