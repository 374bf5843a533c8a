"""Tests for jaxee.data: digits TFDS builder, DataLoader, sources, transforms, latents."""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

from etils import epath
import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import jaxee.data
from jaxee.data import digits
from jaxee.data import latents
from jaxee.data import pipeline
from jaxee.data import tfds_sources
from jaxee.data import transforms


class ToySource:
  """16 records of 4x4x1 images filled with their index; random sign flip in augment."""

  def __init__(self, n=16):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((4, 4, 1), float(i), np.float32), 'label': i % 3, 'id': i}

  def augment(self, ex, rng):
    return dict(ex, image=ex['image'] * rng.choice([-1.0, 1.0]))


def _take(loader, k):
  return [next(loader) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError('network disabled in this test')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  digits.prepare_digits(path)
  return path


# ------------------------------------------------------------------------------------------
# Digits.


def test_digits_prepare_offline(tmp_path, no_network):
  builder = digits.prepare_digits(tmp_path)
  assert builder.is_prepared()
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'test')} == {
      'train': 1500, 'test': 297}
  assert list((tmp_path / 'jaxee_sklearn_digits' / '1.0.0').glob('*.array_record*'))


def test_digits_source_contents(digits_dir):
  train = digits.DigitsSource('train', data_dir=digits_dir, image_size=8)
  test = digits.DigitsSource('test', data_dir=digits_dir, image_size=8)
  assert len(train) + len(test) == 1797
  ids, labels = [], []
  images, sk_labels = digits._load_sklearn_digits()
  for src in (train, test):
    for i in range(len(src)):
      ex = src[i]
      ids.append(ex['id'])
      labels.append(ex['label'])
  assert sorted(ids) == list(range(1797))
  assert set(ids[:1500]) == set(digits.split_indices()['train'].tolist())
  np.testing.assert_array_equal(np.asarray(labels), sk_labels[np.asarray(ids)])
  ex = train[5]
  assert ex['image'].shape == (8, 8, 1) and ex['image'].dtype == np.float32
  np.testing.assert_allclose(ex['image'], images[ex['id']] / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize('size,channels,method', [(16, 1, 'nearest'), (16, 3, 'bilinear'),
                                                  (8, 3, 'nearest')])
def test_digits_resize_and_channels(digits_dir, size, channels, method):
  src = digits.DigitsSource('test', data_dir=digits_dir, image_size=size, channels=channels,
                            resize_method=method)
  native = digits.DigitsSource('test', data_dir=digits_dir, image_size=8)
  x, x8 = src[3]['image'], native[3]['image']
  assert x.shape == (size, size, channels)
  assert x.min() >= -1.0 and x.max() <= 1.0
  if method == 'nearest' and size == 16:
    np.testing.assert_array_equal(x[::2, ::2, :1], x8)
  if channels == 3:
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_get_source_digits_and_unknown(digits_dir):
  src = jaxee.data.get_source('digits', split='train', data_dir=digits_dir)
  assert len(src) == 1500 and src[0]['image'].shape == (16, 16, 1)
  with pytest.raises(ValueError, match='valid names: digits, cifar10'):
    jaxee.data.get_source('mnist')


def test_digits_loader_threads_and_prefetch(digits_dir):
  src = digits.DigitsSource('train', data_dir=digits_dir)
  kwargs = dict(seed=5, process_index=1, process_count=2)
  plain = _take(pipeline.DataLoader(src, 64, **kwargs), 3)
  fast = pipeline.DataLoader(src, 64, prefetch=2, num_threads=2, **kwargs)
  _assert_batches_equal(_take(fast, 3), plain)
  assert plain[0]['image'].shape == (32, 16, 16, 1) and plain[0]['label'].shape == (32,)
  thread = fast._thread
  del fast
  thread.join(timeout=5)
  assert not thread.is_alive()  # A dropped loader stops its prefetch thread.


# ------------------------------------------------------------------------------------------
# DataLoader.


def test_loader_deterministic_and_covers_epoch():
  a = _take(pipeline.DataLoader(ToySource(), 4, seed=3, process_count=1, process_index=0), 8)
  b = _take(pipeline.DataLoader(ToySource(), 4, seed=3, process_count=1, process_index=0), 8)
  c = _take(pipeline.DataLoader(ToySource(), 4, seed=4, process_count=1, process_index=0), 8)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x['id'], y['id']) for x, y in zip(a, c))
  for epoch in (a[:4], a[4:]):
    assert sorted(np.concatenate([x['id'] for x in epoch]).tolist()) == list(range(16))
  assert not np.array_equal(np.concatenate([x['id'] for x in a[:4]]),
                            np.concatenate([x['id'] for x in a[4:]]))
  assert a[0]['image'].dtype == np.float32 and a[0]['label'].dtype == np.int32
  # Augmentation depends on (seed, epoch, record) only: |image| is the id.
  np.testing.assert_array_equal(np.abs(a[0]['image'][:, 0, 0, 0]), a[0]['id'])


@pytest.mark.parametrize('prefetch', [0, 2])
def test_loader_resume_mid_epoch(prefetch):
  make = lambda: pipeline.DataLoader(ToySource(), 3, seed=0, process_count=1, process_index=0,
                                     prefetch=prefetch)
  full = _take(make(), 11)  # 5 batches/epoch (16 // 3): crosses two epoch boundaries.
  first = make()
  _take(first, 4)
  state = first.state()
  assert state == {'epoch': 0, 'index': 12}
  first.close()
  resumed = make()
  resumed.restore(json.loads(json.dumps(state)))
  _assert_batches_equal(_take(resumed, 7), full[4:])
  assert resumed.state() == {'epoch': 2, 'index': 3}


def test_loader_two_processes_split_global_batch():
  noise = lambda ex, rng: dict(ex, noise=rng.standard_normal(2))
  single = pipeline.DataLoader(ToySource(), 8, seed=1, process_index=0, process_count=1,
                               transform=noise)
  procs = [pipeline.DataLoader(ToySource(), 8, seed=1, process_index=p, process_count=2,
                               prefetch=p, transform=noise) for p in (0, 1)]
  for _ in range(5):
    g = next(single)
    p0, p1 = next(procs[0]), next(procs[1])
    assert p0['image'].shape[0] == 4
    assert not set(p0['id'].tolist()) & set(p1['id'].tolist())
    for key in g:
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), g[key])


def test_loader_padding_mask_and_epochs():
  loader = pipeline.DataLoader(ToySource(10), 4, seed=0, shuffle=False, drop_remainder=False,
                               num_epochs=1, process_index=0, process_count=1)
  batches = list(loader)
  assert len(batches) == loader.batches_per_epoch == 3
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0])
  ids = np.concatenate([b['id'][b['mask'] > 0] for b in batches])
  np.testing.assert_array_equal(ids, np.arange(10))
  with pytest.raises(StopIteration):
    next(loader)
  with pytest.raises(ValueError, match='multiple of process_count'):
    pipeline.DataLoader(ToySource(), 5, seed=0, process_index=0, process_count=2)


def test_shard_for_devices_and_global_batch():
  batch = next(pipeline.DataLoader(ToySource(), 16, seed=0, process_index=0, process_count=1))
  sharded = pipeline.shard_for_devices(batch, 8)
  assert sharded['image'].shape == (8, 2, 4, 4, 1) and sharded['label'].shape == (8, 2)
  glob = pipeline.make_global_batch(batch)
  assert glob['image'].shape == (16, 4, 4, 1)
  assert len(glob['image'].sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(glob['id']), batch['id'])


_MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jaxee.data import pipeline

    class Toy:
      def __len__(self):
        return 16
      def __getitem__(self, i):
        return {'image': np.full((2, 2, 1), float(i), np.float32), 'label': i}

    loader = pipeline.DataLoader(Toy(), 8, seed=0)  # process index/count from JAX.
    assert (loader.process_index, loader.process_count) == (int(sys.argv[2]), 2)
    labels = pipeline.make_global_batch(next(loader))['label']
    replicated = jax.sharding.NamedSharding(pipeline.data_mesh(), jax.sharding.PartitionSpec())
    labels = np.asarray(jax.jit(lambda x: x, out_shardings=replicated)(labels))
    single = pipeline.DataLoader(Toy(), 8, seed=0, process_index=0, process_count=1)
    assert labels.tolist() == next(single)['label'].tolist(), labels
    print('OK')
""")


@pytest.mark.slow
def test_make_global_batch_two_real_processes(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'worker.py'
  script.write_text(_MULTIPROCESS_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  procs = [subprocess.Popen([sys.executable, str(script), f'127.0.0.1:{port}', str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0 and 'OK' in out, out[-2000:]


# ------------------------------------------------------------------------------------------
# Transforms and image sources.


def test_adm_center_crop_sizes(monkeypatch):
  calls = []
  original = Image.Image.resize

  def spy(self, size, resample=None, *args, **kwargs):
    calls.append((self.size, tuple(size), resample))
    return original(self, size, resample, *args, **kwargs)

  monkeypatch.setattr(Image.Image, 'resize', spy)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (600, 1000, 3), dtype=np.uint8)  # H=600, W=1000
  out = transforms.center_crop_arr(image, 256)
  # 600 >= 512: BOX halving to 500x300; then short side 300 -> 256: 500 * 256 / 300 = 426.67.
  assert [(c[1], c[2]) for c in calls] == [((500, 300), Image.Resampling.BOX),
                                           ((427, 256), Image.Resampling.BICUBIC)]
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  resized = np.asarray(original(original(Image.fromarray(image), (500, 300), Image.BOX),
                                (427, 256), Image.BICUBIC))
  np.testing.assert_array_equal(out, resized[:, 85:85 + 256])  # (427 - 256) // 2 = 85.
  # A small portrait image is upsampled, no BOX step; vertical offset (128 - 64) // 2 = 32.
  calls.clear()
  assert transforms.center_crop_arr(image[:100, :50], 64).shape == (64, 64, 3)
  assert [(c[1], c[2]) for c in calls] == [((64, 128), Image.Resampling.BICUBIC)]


def test_celeba_recipes():
  image = np.random.default_rng(1).integers(0, 256, (218, 178, 3), dtype=np.uint8)
  uvit = transforms.uvit_celeba64(image)
  box = Image.fromarray(image[57:185, 25:153]).resize((64, 64), Image.BILINEAR)
  np.testing.assert_allclose(uvit, np.asarray(box) / 127.5 - 1.0, atol=1e-6)
  duo = transforms.duodiff_celeba64(image)
  assert duo.shape == (64, 64, 3) and duo.dtype == np.float32
  assert -1.0 <= duo.min() and duo.max() <= 1.0


def test_image_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for cls, sizes in {'cat': [(20, 30), (12, 12)], 'dog': [(40, 16)]}.items():
    (tmp_path / 'train' / cls).mkdir(parents=True)
    for j, (h, w) in enumerate(sizes):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
          tmp_path / 'train' / cls / f'{j}.png')
  (tmp_path / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  src = jaxee.data.get_source(f'folder:{tmp_path}', split='train', image_size=8)
  assert len(src) == 3 and src.classes == ['cat', 'dog'] and src.labels == [0, 0, 1]
  ex = src[2]
  assert ex['image'].shape == (8, 8, 3) and ex['label'] == 1
  expected = transforms.center_crop_arr(src.load_uint8(2), 8) / 127.5 - 1.0
  np.testing.assert_allclose(ex['image'], expected, atol=1e-6)
  flat = tfds_sources.ImageFolderSource(tmp_path / 'train' / 'cat', image_size=4,
                                        crop='resize', channels=1)
  assert flat.labels == [0, 0] and flat[0]['image'].shape == (4, 4, 1)
  batch = next(pipeline.DataLoader(src, 2, seed=0, process_index=0, process_count=1))
  assert batch['image'].shape == (2, 8, 8, 3)


def test_missing_tfds_dataset_error(tmp_path, no_network):
  with pytest.raises(tfds_sources.DatasetNotPreparedError) as err:
    jaxee.data.get_source('cifar10', data_dir=tmp_path)
  message = str(err.value)
  assert 'not prepared' in message and 'tfds build cifar10' in message
  assert 'array_record' in message and str(tmp_path) in message


class _FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Eight random images written under the real 'cifar10' name and version."""

  name = 'cifar10'
  VERSION = tfds.core.Version('3.0.2')
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'id': tfds.features.Text(),
        'image': tfds.features.Image(shape=(32, 32, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(8), 'test': self._generate_examples(2)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      png = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, 'PNG')
      yield i, {'id': f'train_{i}', 'image': png.getvalue(), 'label': i % 10}


def test_prepared_tfds_cifar10_reads(tmp_path, no_network):
  _FakeCifar10(data_dir=tmp_path, file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  src = jaxee.data.get_source('cifar10', split='train', data_dir=tmp_path)
  assert len(src) == 8 and src.random_flip
  ex = src[0]
  assert ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.float32
  assert -1.0 <= ex['image'].min() and ex['image'].max() <= 1.0
  flips = [src.augment(ex, transforms.example_rng(0, 0, i))['image'] for i in range(16)]
  assert any(np.array_equal(f, ex['image'][:, ::-1]) for f in flips)
  assert any(np.array_equal(f, ex['image']) for f in flips)


# ------------------------------------------------------------------------------------------
# Latents.


def test_latent_sampling_formula():
  mean = np.array([[0.5, -1.0]], np.float32)
  logvar = np.array([[100.0, -100.0]], np.float32)  # clipped to 20 and -30
  moments = np.concatenate([mean, logvar], -1)
  eps = np.array([[1.0, 2.0]], np.float32)
  expected = (mean + np.exp(0.5 * np.array([20.0, -30.0])) * eps) * 0.18215
  np.testing.assert_allclose(latents.latents_from_moments(moments, eps), expected, rtol=1e-6)
  key = jax.random.key(0)
  z = latents.sample_latents(moments, key)
  eps_jax = jax.random.normal(key, (1, 2), np.float32)
  np.testing.assert_allclose(
      np.asarray(z), (mean + np.exp(0.5 * np.array([20.0, -30.0])) * eps_jax) * 0.18215,
      rtol=1e-5)


class _ImageSource:
  def __init__(self, n):
    self.images = np.random.default_rng(0).uniform(-1, 1, (n, 4, 4, 3)).astype(np.float32)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': i % 5}


def test_extract_moments_resume_and_latent_source(tmp_path):
  calls = []

  def encode(x):  # (B, 4, 4, 3) -> (B, 2, 2, 4): 2x2 mean pool, mean || logvar.
    calls.append(len(x))
    pooled = x.reshape(len(x), 2, 2, 2, 2, 3).mean((2, 4))[..., :2]
    return np.concatenate([pooled, pooled - 1.0], -1)

  source, out = _ImageSource(10), tmp_path / 'moments'
  meta = latents.extract_moments(source, encode, out, batch_size=2, shard_size=4)
  assert meta['num_shards'] == 3 and meta['moments_shape'] == [2, 2, 4]
  assert len(calls) == 10  # 5 batches, plus their flips.
  reference = {p.name: np.load(p) for p in out.glob('*.npy')}
  # Interruption: the last shard and the metadata were never written.
  (out / 'moments_00002.npy').unlink()
  (out / 'meta.json').unlink()
  with pytest.raises(FileNotFoundError, match='resume'):
    latents.LatentSource(out)
  calls.clear()
  latents.extract_moments(source, encode, out, batch_size=2, shard_size=4)
  assert calls == [2, 2]  # Only the last shard (2 images, and their flips) was encoded.
  for p in out.glob('*.npy'):
    np.testing.assert_array_equal(np.load(p), reference[p.name])
  assert not list(out.glob('*.tmp'))

  src = jaxee.data.get_source(f'latents:{out}')
  assert len(src) == 20
  np.testing.assert_allclose(src[7]['moments'], encode(source.images[7:8])[0])
  np.testing.assert_allclose(src[17]['moments'], encode(source.images[7:8, :, ::-1])[0])
  assert src[17]['label'] == 2
  batch = next(pipeline.DataLoader(src, 4, seed=0, process_index=0, process_count=1))
  assert batch['image'].shape == (4, 2, 2, 2) and set(batch) == {'image', 'label'}
  again = next(pipeline.DataLoader(src, 4, seed=0, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['image'], again['image'])
  assert len(latents.LatentSource(out, include_flips=False)) == 10


def test_on_the_fly_latents():
  encode = lambda x: jax.numpy.concatenate([x[..., :2], x[..., :2] * 0.0], -1)
  wrap = latents.OnTheFlyLatents(encode)
  images = np.ones((2, 4, 4, 3), np.float32)
  key = jax.random.key(1)
  out = wrap({'image': images, 'label': np.zeros(2, np.int32)}, key)
  expected = latents.sample_latents(encode(images), key)
  np.testing.assert_allclose(np.asarray(out['image']), np.asarray(expected), rtol=1e-6)
  assert out['image'].shape == (2, 4, 4, 2)
