"""The web app as a user meets it: Voila serving `nucleus_app.ipynb` on 127.0.0.1, headless Debian Chromium driven by
Playwright (`executable_path`, never Playwright's own browser download). Uploads a real DSB2018 image, waits for the
overlay and the count, saves a screenshot, then uploads a text file and sees the error message, then an image again
(the app kept serving), and last a pink H&E image in the red view, chosen in the view box. `.ci/install_browser.sh`
installs chromium, voila and playwright.

Screenshots go to `$NUCLEUS_SEG_ARTIFACTS` if set, else pytest's tmp_path (printed)."""
import io, os, shutil, zipfile
from pathlib import Path
import pytest

CHROMIUM = os.environ.get('CHROMIUM') or shutil.which('chromium') or '/usr/bin/chromium'
_missing = [m for m in ('playwright', 'voila', 'ipykernel') if not __import__('importlib').util.find_spec(m)]
if not Path(CHROMIUM).exists(): _missing.append('chromium')
if _missing:
    # CI installs everything (.ci/install_browser.sh): there a missing piece is a failure, not a skip
    if os.environ.get('CI'): raise RuntimeError(f'browser test needs {_missing}: run .ci/install_browser.sh')
    pytest.skip(f'browser test needs {_missing} (bash .ci/install_browser.sh)', allow_module_level=True)

from playwright.sync_api import sync_playwright
from nucleus_seg.data import dsb_path
from nucleus_seg.app import serve_app, decode_upload, app_segmenter

ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync']
IMAGE_ID = '003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1'  # fluorescence, 36 nuclei
PINK_ID = '57bd029b19c1b382bef9db3ac14f13ea85e36a6053b92e46caedee95c05847ab'   # H&E tissue stained pink


@pytest.fixture(scope='module')
def workdir(tmp_path_factory): return tmp_path_factory.mktemp('app_browser')


def training_png(workdir, image_id):
    "The original PNG of a training image, straight from the zip, as a user would have it."
    with zipfile.ZipFile(dsb_path()/'stage1_train.zip') as z: b = z.read(f'{image_id}/images/{image_id}.png')
    fn = workdir/f'{image_id[:12]}.png'; fn.write_bytes(b)
    return fn


@pytest.fixture(scope='module')
def dsb_png(workdir): return training_png(workdir, IMAGE_ID)


@pytest.fixture(scope='module')
def pink_png(workdir): return training_png(workdir, PINK_ID)


@pytest.fixture(scope='module')
def server(workdir, serve_process):
    with serve_process(lambda log: serve_app(port=0, log=log), workdir/'voila.log', timeout=120) as proc: yield proc
    print('voila log:', workdir/'voila.log')


@pytest.fixture(scope='module')
def page(server, workdir):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)  # fresh temporary profile
        pg = browser.new_page(viewport=dict(width=1280, height=900))
        pg.set_default_timeout(120_000)
        pg.goto(server.url, timeout=180_000)  # Voila answers once the kernel has run the notebook
        pg.locator('.nucleus-upload').wait_for(state='visible', timeout=120_000)
        yield pg
        browser.close()


def upload(page, *files):
    with page.expect_file_chooser() as fc: page.locator('.nucleus-upload').click()
    fc.value.set_files([str(f) for f in files])


def screenshot_dir(workdir):
    d = Path(os.environ.get('NUCLEUS_SEG_ARTIFACTS') or workdir); d.mkdir(parents=True, exist_ok=True)
    return d


def test_page_says_which_model(page):
    text = page.locator('.nucleus-model').inner_text()
    assert 'bundled model' in text and 'default.safetensors' in text  # no model named: the package's own


def test_upload_image_shows_overlay_and_count(page, dsb_png, workdir):
    expected = app_segmenter().segment(decode_upload(dsb_png.name, dsb_png.read_bytes()))  # what the page's segmenter finds
    n = len(set(expected[expected>0].ravel().tolist()))
    upload(page, dsb_png)
    count = page.locator('.nucleus-count')
    count.wait_for(state='visible', timeout=120_000)
    assert f'{n} nuclei' in count.inner_text()
    assert dsb_png.name in count.inner_text()
    # the overlay image has really been decoded by the browser, at the image's size
    page.wait_for_function("""() => { const im = document.querySelector('.nucleus-overlay');
                                        return im && im.complete && im.naturalWidth > 0; }""", timeout=60_000)
    assert page.locator('.nucleus-overlay').evaluate('im => [im.naturalWidth, im.naturalHeight]') == [256, 256]
    assert page.locator('.nucleus-table-widget tbody tr').count() == n
    hrefs = page.locator('a.nucleus-download').evaluate_all('as => as.map(a => a.download)')
    assert hrefs == [f'{dsb_png.stem}_label.png', f'{dsb_png.stem}_rle.csv', f'{dsb_png.stem}_nuclei.csv']
    fn = screenshot_dir(workdir)/'app_upload.png'
    page.set_viewport_size(dict(width=1280, height=1700))  # Voila scrolls an inner element: make the card fit
    page.screenshot(path=str(fn))
    print('screenshot:', fn)
    assert fn.stat().st_size > 10_000


def test_text_file_gives_message_and_app_keeps_serving(page, dsb_png, workdir):
    txt = workdir/'notes.txt'; txt.write_text('these are not the pixels you are looking for\n')
    upload(page, txt)
    err = page.locator('.upload-error')
    err.wait_for(state='visible', timeout=60_000)
    assert 'notes.txt: not an image' in err.inner_text()
    assert page.locator('.nucleus-count').count() == 0
    page.screenshot(path=str(screenshot_dir(workdir)/'app_error.png'))
    upload(page, dsb_png)  # still serving
    page.locator('.nucleus-count').wait_for(state='visible', timeout=120_000)
    assert page.locator('.upload-error').count() == 0


def test_view_box_segments_pink_tissue_in_red(page, pink_png, workdir):
    from nucleus_seg.inference import load_segmenter
    expected = load_segmenter(input_mode='red').segment(decode_upload(pink_png.name, pink_png.read_bytes()))
    n = len(set(expected[expected>0].ravel().tolist()))
    view = page.locator('.nucleus-view select')
    view.select_option(label='red (pink H&E)')
    upload(page, pink_png)
    card = page.locator('.nucleus-count', has_text=pink_png.name)
    card.wait_for(state='visible', timeout=120_000)
    assert f'{n} nuclei' in card.inner_text() and 'red view' in card.inner_text()
    page.screenshot(path=str(screenshot_dir(workdir)/'app_red_view.png'))
    view.select_option(label='grey (as trained)')
