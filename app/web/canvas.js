// The image workspace (runs as gr.HTML's js_on_load: `element`, `trigger`, `props`, `watch`).
//
// Layout: `.vl2-world` holds the image at its ORIGINAL pixel size with an SVG over it whose
// viewBox is the same, so a box's xyxy from the server is drawn as-is; zoom and pan are one CSS
// transform of the world. Captions, pins and the tooltip live in a screen-space overlay (they keep
// their size at any zoom and are laid out so they never overlap).
const SVG = 'http://www.w3.org/2000/svg';
const root = element.querySelector('.vl2');
const stage = root.querySelector('.vl2-stage');
const world = root.querySelector('.vl2-world');
const img = root.querySelector('.vl2-img');
const svg = root.querySelector('.vl2-svg');
const overlay = root.querySelector('.vl2-overlay');
const landing = root.querySelector('.vl2-landing');
const examples = root.querySelector('.vl2-examples');
const pendingNote = root.querySelector('.vl2-pending');
const tip = root.querySelector('.vl2-tip');
const strip = root.querySelector('.vl2-strip');
const nameLabel = root.querySelector('.vl2-name');

let data = null; // the server's last value
let shownUrl = null; // the image now in <img>
let size = null; // [width, height] of the image in original pixels
let preview = null; // {url, name} of an image attached but not sent yet
let sending = false; // a message was sent; keep its preview until the server shows the image
let attachedCount = 0; // files on the prompt, as last reported
let view = { s: 1, tx: 0, ty: 0 };
let fitted = true; // follow the stage's size until the user zooms or pans
let hovered = null;
let showBoxes = true;
let showCaptions = true;

const promptInput = () => document.querySelector('#prompt input[type=file]');
const promptText = () => document.querySelector('#prompt textarea');

// -- drawing ----------------------------------------------------------------------------------

function luminance(rgb) {
  const channel = (v) => {
    const c = v / 255;
    return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  };
  return 0.2126 * channel(rgb[0]) + 0.7152 * channel(rgb[1]) + 0.0722 * channel(rgb[2]);
}

function captionColors(hex) {
  // A caption in its box's colour, readable at WCAG AA (4.5:1): black text where that reads,
  // else white text on the colour darkened just enough (a mid red reaches 4.5:1 with neither).
  let rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  if ((luminance(rgb) + 0.05) / 0.05 >= 4.5) return { bg: hex, fg: '#000' };
  while (1.05 / (luminance(rgb) + 0.05) < 4.5) rgb = rgb.map((v) => v * 0.92);
  return { bg: `rgb(${rgb.map(Math.round).join(', ')})`, fg: '#fff' };
}

function boxes() {
  return showBoxes && data && data.image && !preview ? data.boxes : [];
}

function drawBoxes() {
  svg.replaceChildren();
  // Largest first, so a box inside another is on top and can be hovered and clicked.
  const area = (b) => (b.xyxy[2] - b.xyxy[0]) * (b.xyxy[3] - b.xyxy[1]);
  for (const b of [...boxes()].sort((a, c) => area(c) - area(a))) {
    const g = document.createElementNS(SVG, 'g');
    g.setAttribute('class', 'vl2-box' + (b.selected ? ' selected' : '') + (b.n === hovered ? ' hover' : ''));
    g.setAttribute('data-box-index', String(b.n));
    g.setAttribute('data-label', b.label);
    g.style.setProperty('--c', b.color);
    const [x1, y1, x2, y2] = b.xyxy;
    const rect = document.createElementNS(SVG, 'rect');
    for (const [k, v] of [['x', x1], ['y', y1], ['width', Math.max(x2 - x1, 1)], ['height', Math.max(y2 - y1, 1)]]) {
      rect.setAttribute(k, String(v));
    }
    rect.setAttribute('vector-effect', 'non-scaling-stroke');
    const title = document.createElementNS(SVG, 'title');
    title.textContent = `${b.n}: ${b.label}`;
    g.append(rect, title);
    svg.append(g);
  }
}

function layoutOverlay() {
  // Screen-space layer: pins, then captions placed top-down so that none overlaps another.
  overlay.replaceChildren();
  if (!data || !data.image || preview) return;
  for (const [x, y] of data.pins || []) {
    const pin = document.createElement('div');
    pin.className = 'vl2-pin';
    pin.style.left = `${view.tx + x * view.s}px`;
    pin.style.top = `${view.ty + y * view.s}px`;
    overlay.append(pin);
  }
  if (!showCaptions) return;
  const placed = [];
  const sorted = [...boxes()].sort((a, b) => a.xyxy[1] - b.xyxy[1] || a.xyxy[0] - b.xyxy[0]);
  for (const b of sorted.slice(0, 300)) {
    const cap = document.createElement('div');
    cap.className = 'vl2-cap' + (b.selected ? ' selected' : '') + (b.n === hovered ? ' hover' : '');
    cap.dataset.captionFor = String(b.n);
    cap.textContent = `${b.n} ${b.label}`;
    const colors = captionColors(b.color);
    cap.style.background = colors.bg;
    cap.style.color = colors.fg;
    overlay.append(cap);
    const w = cap.offsetWidth;
    const h = cap.offsetHeight;
    const right = stage.clientWidth - w - 2;
    let x = Math.max(Math.min(view.tx + b.xyxy[0] * view.s, right), 0); // kept inside the stage
    let y = view.ty + b.xyxy[1] * view.s - h; // above the box
    if (y < 0) y = view.ty + b.xyxy[1] * view.s; // or inside its top edge
    const hits = (px, py) => placed.find((p) => px < p.x + p.w && px + w > p.x && py < p.y + p.h && py + h > p.y);
    for (let tries = 0, other = hits(x, y); other && tries < 40; tries++, other = hits(x, y)) {
      y = other.y + other.h + 1; // below the caption it would cover
    }
    placed.push({ x, y, w, h });
    cap.style.left = `${x}px`;
    cap.style.top = `${y}px`;
  }
}

function apply() {
  world.style.transform = `translate(${view.tx}px, ${view.ty}px) scale(${view.s})`;
  layoutOverlay();
}

function fitScale() {
  const r = stage.getBoundingClientRect();
  return size ? Math.min(r.width / size[0], r.height / size[1]) : 1;
}

function sizeStage() {
  // The stage follows the image's aspect (CSS bounds its height), so no band is left empty.
  if (size) stage.style.setProperty('--vl2-h', `${(stage.clientWidth * size[1]) / size[0]}px`);
  else stage.style.removeProperty('--vl2-h');
}

function fit() {
  sizeStage();
  if (!size) return;
  const r = stage.getBoundingClientRect();
  const s = fitScale();
  view = { s, tx: (r.width - size[0] * s) / 2, ty: (r.height - size[1] * s) / 2 };
  fitted = true;
  apply();
}

function zoomAt(factor, cx, cy) {
  if (!size) return;
  const s = Math.min(Math.max(view.s * factor, fitScale() * 0.5), 64);
  view = { s, tx: cx - ((cx - view.tx) * s) / view.s, ty: cy - ((cy - view.ty) * s) / view.s };
  fitted = false;
  apply();
}

function zoomCentre(factor) {
  const r = stage.getBoundingClientRect();
  zoomAt(factor, r.width / 2, r.height / 2);
}

function showImage(url, width, height) {
  size = width && height ? [width, height] : size;
  if (url !== shownUrl) {
    shownUrl = url;
    img.src = url;
  }
  if (size) {
    world.style.width = `${size[0]}px`;
    world.style.height = `${size[1]}px`;
    svg.setAttribute('viewBox', `0 0 ${size[0]} ${size[1]}`);
    svg.setAttribute('width', String(size[0]));
    svg.setAttribute('height', String(size[1]));
  }
}

function renderStrip() {
  const images = (data && data.images) || [];
  strip.hidden = images.length < 2;
  strip.replaceChildren(
    ...images.map((entry, i) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'vl2-thumb' + (entry.active ? ' active' : '');
      button.title = `${i + 1}: ${entry.name}`;
      button.dataset.key = entry.key;
      const thumb = document.createElement('img');
      thumb.src = entry.url;
      thumb.alt = entry.name;
      button.append(thumb);
      return button;
    }),
  );
}

function renderExamples() {
  const list = (data && data.examples) || [];
  examples.replaceChildren(
    ...list.map((example) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'vl2-example';
      button.dataset.example = String(example.index);
      button.title = `${example.mode}: ${example.text}`;
      const thumb = document.createElement('img');
      thumb.src = example.thumb;
      thumb.alt = '';
      const caption = document.createElement('span');
      caption.textContent = example.label;
      button.append(thumb, caption);
      return button;
    }),
  );
}

function render() {
  const image = data && data.image;
  const previous = size;
  if (preview) {
    showImage(preview.url, null, null);
  } else if (image) {
    showImage(image.url, image.width, image.height);
  } else {
    shownUrl = null;
    size = null;
    img.removeAttribute('src');
  }
  const empty = !preview && !image;
  root.classList.toggle('empty', empty);
  landing.hidden = !empty;
  pendingNote.hidden = !preview;
  nameLabel.textContent = preview ? preview.name : image ? image.name : '';
  renderExamples();
  renderStrip();
  drawBoxes();
  if (size && (fitted || !previous || previous[0] !== size[0] || previous[1] !== size[1])) fit();
  else {
    sizeStage();
    apply();
  }
}

// -- the server's value -------------------------------------------------------------------------

function take(value) {
  const before = data && data.image ? data.image.key : null;
  data = value || null;
  const now = data && data.image ? data.image.key : null;
  // A new active image from the server is the one just sent: the local preview has done its job.
  if (preview && now !== before) preview = null;
  sending = false;
  render();
}

watch('value', () => take(props.value));

// -- hover, selection -------------------------------------------------------------------------

function markLinked(n, on) {
  // The chat keeps no data-* attributes (its sanitizer), so its phrases carry the number as a class.
  for (const el of document.querySelectorAll(`#chat mark.vl2-box-${n}, #box-panel [data-box-index="${n}"]`)) {
    el.classList.toggle('vl2-hover', on);
  }
}

function hover(n, event) {
  if (hovered === n) return;
  if (hovered !== null) markLinked(hovered, false);
  hovered = n;
  for (const g of svg.querySelectorAll('.vl2-box')) g.classList.toggle('hover', Number(g.dataset.boxIndex) === n);
  for (const c of overlay.querySelectorAll('.vl2-cap')) c.classList.toggle('hover', Number(c.dataset.captionFor) === n);
  if (n === null) {
    tip.hidden = true;
    return;
  }
  markLinked(n, true);
  const b = data && data.boxes.find((box) => box.n === n);
  if (!b) return;
  tip.textContent = `${b.n}: ${b.label} · ${b.xyxy.map((v) => Math.round(v)).join(', ')} px`;
  // The tooltip follows a pointer on the image; hovering the phrase or the panel row lights the box only.
  tip.hidden = !(event && stage.contains(event.target));
  placeTip(event);
}

function placeTip(event) {
  if (tip.hidden || !event) return;
  const r = stage.getBoundingClientRect();
  const x = Math.min(event.clientX - r.left + 14, r.width - tip.offsetWidth - 4);
  const y = Math.min(event.clientY - r.top + 14, r.height - tip.offsetHeight - 4);
  tip.style.left = `${Math.max(x, 4)}px`;
  tip.style.top = `${Math.max(y, 4)}px`;
}

function select(n) {
  if (!data || !Number.isInteger(n) || n < 1) return;
  // Shown at once; the server then selects the same box in the panel and the answer.
  for (const g of svg.querySelectorAll('.vl2-box')) g.classList.toggle('selected', Number(g.dataset.boxIndex) === n);
  trigger('select_box', { index: n });
}

svg.addEventListener('pointerover', (e) => {
  if (e.pointerType === 'touch') return; // a tap selects; there is no hover to show on a touch screen
  const g = e.target.closest && e.target.closest('[data-box-index]');
  if (g && !panning) hover(Number(g.dataset.boxIndex), e);
});
svg.addEventListener('pointerout', (e) => {
  const to = e.relatedTarget && e.relatedTarget.closest && e.relatedTarget.closest('[data-box-index]');
  if (!to) hover(null);
});
stage.addEventListener('pointermove', (e) => placeTip(e));

// -- zoom, pan, click -------------------------------------------------------------------------

const pointers = new Map();
let press = null; // {x, y, box} of a press that may become a click
let panning = false;
let pinch = null;
let pendingPoint = null;
const DOUBLE_CLICK_MS = 250;

function stagePoint(e) {
  const r = stage.getBoundingClientRect();
  return [e.clientX - r.left, e.clientY - r.top];
}

stage.addEventListener('pointerdown', (e) => {
  if (!size || e.target.closest('.vl2-landing')) return;
  stage.setPointerCapture(e.pointerId);
  pointers.set(e.pointerId, stagePoint(e));
  if (pointers.size === 1) {
    const g = e.target.closest && e.target.closest('[data-box-index]');
    press = { x: e.clientX, y: e.clientY, box: g ? Number(g.dataset.boxIndex) : null };
  } else if (pointers.size === 2) {
    press = null;
    const [a, b] = [...pointers.values()];
    pinch = { d: Math.hypot(a[0] - b[0], a[1] - b[1]) };
  }
});

stage.addEventListener('pointermove', (e) => {
  if (!pointers.has(e.pointerId)) return;
  const before = pointers.get(e.pointerId);
  const now = stagePoint(e);
  pointers.set(e.pointerId, now);
  if (pointers.size === 2 && pinch) {
    const [a, b] = [...pointers.values()];
    const d = Math.hypot(a[0] - b[0], a[1] - b[1]);
    if (pinch.d > 0) zoomAt(d / pinch.d, (a[0] + b[0]) / 2, (a[1] + b[1]) / 2);
    pinch.d = d;
    return;
  }
  if (press && Math.hypot(e.clientX - press.x, e.clientY - press.y) > 5) {
    press = null; // a drag, not a click
    panning = true;
    hover(null);
  }
  if (panning) {
    view.tx += now[0] - before[0];
    view.ty += now[1] - before[1];
    fitted = false;
    apply();
  }
});

function release(e) {
  if (!pointers.has(e.pointerId)) return;
  pointers.delete(e.pointerId);
  if (pointers.size < 2) pinch = null;
  if (pointers.size > 0) return;
  panning = false;
  const click = press;
  press = null;
  if (!click || e.type === 'pointercancel' || preview) return;
  if (click.box !== null) {
    select(click.box);
    return;
  }
  // Anywhere else on the image: "what is this?" at that point, in original pixels — unless this
  // click turns out to be the first of a double-click (which fits the image instead).
  const r = stage.getBoundingClientRect();
  const x = (e.clientX - r.left - view.tx) / view.s;
  const y = (e.clientY - r.top - view.ty) / view.s;
  if (data && data.image && x >= 0 && y >= 0 && x <= size[0] && y <= size[1]) {
    const key = data.image.key;
    clearTimeout(pendingPoint);
    pendingPoint = setTimeout(() => trigger('point', { key, x, y }), DOUBLE_CLICK_MS);
  }
}
stage.addEventListener('pointerup', release);
stage.addEventListener('pointercancel', release);
stage.addEventListener('dblclick', (e) => {
  e.preventDefault();
  clearTimeout(pendingPoint);
  fit();
});
stage.addEventListener(
  'wheel',
  (e) => {
    if (!size) return;
    e.preventDefault();
    const [x, y] = stagePoint(e);
    zoomAt(Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)), x, y);
  },
  { passive: false },
);
new ResizeObserver(() => (fitted ? fit() : apply())).observe(stage);
img.addEventListener('load', () => {
  if (preview && !size) {
    size = [img.naturalWidth, img.naturalHeight];
    showImage(preview.url, size[0], size[1]);
    fit();
  }
});

// -- toolbar, strip, examples ---------------------------------------------------------------------

root.addEventListener('click', (e) => {
  const act = e.target.closest('[data-act]');
  if (act && act.tagName === 'BUTTON') {
    const what = act.dataset.act;
    if (what === 'open') promptInput() && promptInput().click();
    else if (what === 'zoom-in') zoomCentre(1.25);
    else if (what === 'zoom-out') zoomCentre(0.8);
    else if (what === 'fit') fit();
    return;
  }
  const thumb = e.target.closest('.vl2-thumb');
  if (thumb) {
    trigger('pick_image', { key: thumb.dataset.key });
    return;
  }
  const example = e.target.closest('.vl2-example');
  if (example) {
    sending = true;
    trigger('example', { index: Number(example.dataset.example) });
  }
});
root.addEventListener('change', (e) => {
  const act = e.target.dataset && e.target.dataset.act;
  if (act === 'boxes') showBoxes = e.target.checked;
  else if (act === 'captions') showCaptions = e.target.checked;
  else return;
  drawBoxes();
  layoutOverlay();
});

// -- adding images: drop, paste, browse -------------------------------------------------------

function attach(files) {
  // The images go into the prompt's own file input, so the prompt shows and sends them as if
  // they had been attached there; the canvas shows the last one at once.
  const images = [...files].filter((f) => f.type.startsWith('image/'));
  const input = promptInput();
  if (!images.length || !input) return;
  const transfer = new DataTransfer();
  for (const f of images) transfer.items.add(f);
  input.files = transfer.files;
  input.dispatchEvent(new Event('change', { bubbles: true }));
  const last = images[images.length - 1];
  preview = { url: URL.createObjectURL(last), name: last.name };
  size = null;
  render();
}

root.addEventListener('dragover', (e) => {
  if (![...(e.dataTransfer ? e.dataTransfer.types : [])].includes('Files')) return;
  e.preventDefault();
  root.classList.add('dragging');
});
root.addEventListener('dragleave', (e) => {
  if (!root.contains(e.relatedTarget)) root.classList.remove('dragging');
});
root.addEventListener('drop', (e) => {
  e.preventDefault();
  root.classList.remove('dragging');
  attach(e.dataTransfer ? e.dataTransfer.files : []);
});
document.addEventListener('paste', (e) => {
  // The prompt handles a paste into itself; anywhere else on the page, images come here.
  if (e.target.closest && e.target.closest('#prompt')) return;
  const files = e.clipboardData ? e.clipboardData.files : [];
  if (files.length) {
    e.preventDefault();
    attach(files);
  }
});

// -- keyboard -----------------------------------------------------------------------------------

const TEXT_INPUTS = ['text', 'search', 'number', 'email', 'url', 'password', 'tel', ''];
function typingIn(el) {
  if (!el) return false;
  if (el.isContentEditable || el.tagName === 'TEXTAREA' || el.tagName === 'SELECT') return true;
  return el.tagName === 'INPUT' && TEXT_INPUTS.includes(el.type);
}

document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape') {
    const stop = document.querySelector('#prompt button.stop-button');
    if (stop) stop.click();
    return;
  }
  // Never take a key from a field the user is typing in, nor one with a modifier.
  if (typingIn(document.activeElement) || e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
  if (/^[1-9]$/.test(e.key)) {
    e.preventDefault();
    select(Number(e.key));
    return;
  }
  if (!root.contains(document.activeElement)) return;
  if (e.key === '+' || e.key === '=') zoomCentre(1.25);
  else if (e.key === '-') zoomCentre(0.8);
  else if (e.key === '0') fit();
  else if (e.key.length === 1) {
    // Typing on the workspace goes to the prompt, as if it had kept the focus.
    const text = promptText();
    if (!text) return;
    e.preventDefault();
    text.focus();
    text.setRangeText(e.key, text.selectionStart, text.selectionEnd, 'end');
    text.dispatchEvent(new Event('input', { bubbles: true }));
    return;
  } else return;
  e.preventDefault();
});

// The page's hooks (app/web/page.js): the prompt's attachments and its Send.
window.vl2Canvas = {
  attached(value) {
    const files = (value && value.files) || [];
    const before = attachedCount;
    attachedCount = files.length;
    if (files.length) {
      const last = files[files.length - 1];
      const url = last.url || (last.path ? `gradio_api/file=${encodeURIComponent(last.path)}` : null);
      if (url && (!preview || preview.url.startsWith('gradio_api') || preview.name !== last.orig_name)) {
        preview = { url, name: last.orig_name || 'image' };
        size = null;
        render();
      }
    } else if (preview && !sending && before > 0) {
      // The user took the attachment off the prompt. (The prompt also reports an empty list while
      // it takes in a dropped file: that one must not clear the preview.)
      preview = null;
      render();
    }
  },
  sent() {
    sending = true;
    hover(null);
    // The workspace takes the focus (digits select boxes, Esc stops); typing returns to the prompt.
    root.focus({ preventScroll: true });
  },
  hover,
  select,
};

take(props.value);
