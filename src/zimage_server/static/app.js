// The zimage-server page: plain JavaScript, no build step, no network beyond this server.
// It speaks the public API: POST v1/images/generations (JSON) and v1/images/edits (multipart),
// relative to the page (so it also works behind a proxy that mounts the server under a prefix),
// both with stream=true, and reads the server-sent events as they arrive.
'use strict';

const KEY_STORAGE = 'zimage.apiKey';
const PARTIAL_IMAGES = 2;
const EDIT_MAX_PIXELS = 1024 * 1024; // edits are sized like the input, scaled to about 1 megapixel
// Sizes each variant is trained around (about 1 megapixel, multiples of 16).
const SIZE_PRESETS = {
  turbo: [['Square', 1024, 1024], ['Portrait', 864, 1152], ['Landscape', 1152, 864]],
  base: [['Square', 1024, 1024], ['Portrait', 832, 1216], ['Landscape', 1216, 832]],
  edit: [['Square', 1024, 1024], ['Portrait', 832, 1216], ['Landscape', 1216, 832]],
};

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

const state = {
  variant: 'turbo',
  defaults: null, // the served model's defaults, as GET v1/models gives them
  apiKey: localStorage.getItem(KEY_STORAGE) || '',
  afterKey: null, // what to retry once the user has given a key
  size: null, // [width, height] of the chosen preset, or null for custom
};

// ---- talking to the server --------------------------------------------------------------

class AuthNeeded extends Error {}

// An error the server explained: its message, and the request field it blames, if any.
class ApiError extends Error {
  constructor(message, param = null) {
    super(message);
    this.param = param;
  }
}

async function request(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (state.apiKey) headers.set('Authorization', `Bearer ${state.apiKey}`);
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) throw new AuthNeeded();
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    if (error && error.message) return new ApiError(error.message, error.param);
  } catch (_) { /* not the JSON envelope: a proxy or a crash page */ }
  return new ApiError(`The server answered ${response.status} ${response.statusText || ''}`.trim());
}

// Yields {event, data} for each server-sent event of a fetch response body.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) yield { event, data: JSON.parse(data.join('\n')) };
    }
  }
}

// ---- the API key --------------------------------------------------------------------------

function askForKey(retry) {
  state.afterKey = retry;
  const form = $('#key-form');
  form.hidden = false;
  $('#key-button').hidden = false;
  const input = $('#api-key');
  input.value = state.apiKey;
  input.focus();
}

$('#key-form').addEventListener('submit', (event) => {
  event.preventDefault();
  state.apiKey = $('#api-key').value.trim();
  if (state.apiKey) localStorage.setItem(KEY_STORAGE, state.apiKey);
  else localStorage.removeItem(KEY_STORAGE);
  $('#key-form').hidden = true;
  const retry = state.afterKey;
  state.afterKey = null;
  if (retry) retry();
});

$('#key-button').addEventListener('click', () => askForKey(null));
$('#key-button').hidden = !state.apiKey;

// ---- model and defaults ------------------------------------------------------------------

async function loadModel() {
  try {
    const models = await (await request('v1/models')).json();
    const model = models.data[0];
    $('#model').textContent = model.id;
    state.variant = model.id.replace(/^z-image-/, '');
    state.defaults = model.defaults;
  } catch (error) {
    if (error instanceof AuthNeeded) return askForKey(loadModel);
    $('#model').textContent = 'loading…';
    setTimeout(loadModel, 2000);
    return;
  }
  applyVariantDefaults();
}

function applyVariantDefaults() {
  const defaults = state.defaults;
  for (const input of $$('[data-field="num_inference_steps"]')) input.value = defaults.num_inference_steps;
  for (const input of $$('[data-field="guidance_scale"]')) input.value = defaults.guidance_scale;
  renderSizePresets();
  updateNegativeHints();
}

function renderSizePresets() {
  const holder = $('#gen-size-presets');
  holder.replaceChildren();
  const presets = [...(SIZE_PRESETS[state.variant] || SIZE_PRESETS.turbo), ['Custom', 0, 0]];
  presets.forEach(([name, width, height], i) => {
    const button = document.createElement('button');
    button.type = 'button';
    button.dataset.size = width ? `${width}x${height}` : 'custom';
    button.innerHTML = width ? `${name}<small>${width}×${height}</small>` : `${name}<small>any</small>`;
    button.setAttribute('aria-pressed', i === 0 ? 'true' : 'false');
    button.addEventListener('click', () => chooseSize(button));
    holder.append(button);
  });
  chooseSize(holder.firstElementChild);
}

function chooseSize(button) {
  for (const other of $$('#gen-size-presets button')) other.setAttribute('aria-pressed', String(other === button));
  const custom = button.dataset.size === 'custom';
  $('#gen-custom-size').hidden = !custom;
  state.size = custom ? null : button.dataset.size.split('x').map(Number);
  if (custom) $('#gen-width').focus();
}

function chosenSize() {
  if (state.size) return `${state.size[0]}x${state.size[1]}`;
  return `${$('#gen-width').value || 0}x${$('#gen-height').value || 0}`;
}

function updateNegativeHints() {
  for (const form of $$('form.task')) {
    const guidance = Number($('[data-field="guidance_scale"]', form).value || 0);
    $('[data-negative-hint]', form).textContent = guidance > 0 ? '' : '(no effect at guidance 0)';
  }
}

// ---- shared controls: steps, guidance, n, seed; the error box, run button and progress bar -------

for (const holder of $$('.task-footer')) {
  holder.append($('#task-footer').content.cloneNode(true));
  $('[data-run]', holder).textContent = holder.dataset.runLabel;
}

for (const holder of $$('[data-common-controls]')) {
  holder.append($('#common-controls').content.cloneNode(true));
  const random = $('[data-field="random_seed"]', holder);
  const seed = $('[data-field="seed"]', holder);
  random.addEventListener('change', () => {
    seed.disabled = random.checked;
    if (!random.checked && seed.value === '') seed.value = Math.floor(Math.random() * 2 ** 32);
  });
  $('[data-field="guidance_scale"]', holder).addEventListener('input', updateNegativeHints);
}

function commonFields(form) {
  const field = (name) => $(`[data-field="${name}"]`, form);
  const fields = { n: Number(field('n').value || 1) };
  if (field('num_inference_steps').value !== '') fields.num_inference_steps = Number(field('num_inference_steps').value);
  if (field('guidance_scale').value !== '') fields.guidance_scale = Number(field('guidance_scale').value);
  if (!field('random_seed').checked && field('seed').value !== '') fields.seed = Number(field('seed').value);
  return fields;
}

function reuseSeed(task, seed) {
  showTab(task);
  const form = $(`#${task}-form`);
  $('[data-field="random_seed"]', form).checked = false;
  const input = $('[data-field="seed"]', form);
  input.disabled = false;
  input.value = seed;
  input.focus();
}

// ---- tabs --------------------------------------------------------------------------------

function showTab(task) {
  for (const tab of $$('[role="tab"]')) {
    const selected = tab.id === `tab-${task}`;
    tab.setAttribute('aria-selected', String(selected));
    $(`#${tab.getAttribute('aria-controls')}`).hidden = !selected;
  }
}
$('#tab-generate').addEventListener('click', () => showTab('generate'));
$('#tab-edit').addEventListener('click', () => showTab('edit'));

// ---- running a task with progress, previews and results ------------------------------------

function showError(form, message, param = null) {
  const box = $('.error', form);
  box.textContent = message;
  box.hidden = false;
  for (const input of $$('[aria-invalid]', form)) input.removeAttribute('aria-invalid');
  const culprits = {
    size: ['#gen-width', '#gen-height'],
    prompt: ['textarea[name="prompt"]'],
    image: ['#edit-file'],
    mask: ['#edit-mask'],
  }[param] || (param ? [`[data-field="${param}"]`] : []);
  for (const selector of culprits) {
    const input = $(selector, form);
    if (input) input.setAttribute('aria-invalid', 'true');
  }
}

function clearError(form) {
  $('.error', form).hidden = true;
  for (const input of $$('[aria-invalid]', form)) input.removeAttribute('aria-invalid');
}

function setProgress(form, fraction, text) {
  const bar = $('.bar', form);
  const percent = Math.round(fraction * 100);
  $('span', bar).style.width = `${percent}%`;
  bar.setAttribute('aria-valuenow', String(percent));
  $('.status', form).textContent = text;
}

function b64ToBlob(b64, type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function newCard(task, params, index) {
  const card = $('#card').content.firstElementChild.cloneNode(true);
  card.classList.add('pending');
  card.dataset.task = task;
  $('.prompt', card).textContent = params.prompt;
  $('.meta', card).textContent = index === 0 ? 'Waiting for the GPU…' : 'Queued…';
  $('.card-actions', card).hidden = true;
  const [width, height] = params.size.split('x').map(Number);
  if (width > 0 && height > 0) $('.frame', card).style.aspectRatio = `${width} / ${height}`;
  $('#gallery').prepend(card);
  $('#gallery-empty').hidden = true;
  return card;
}

function showPreview(card, b64, format) {
  $('img', card).src = `data:image/${format};base64,${b64}`;
  card.classList.add('previewing');
}

function finishCard(card, task, params, event) {
  const type = `image/${event.output_format}`;
  const url = URL.createObjectURL(b64ToBlob(event.b64_json, type));
  const img = $('img', card);
  img.src = url;
  img.alt = params.prompt;
  card.classList.remove('pending', 'previewing');
  const details = [event.size.replace('x', '×'), `seed ${event.seed}`];
  if (params.num_inference_steps) details.push(`${params.num_inference_steps} steps`);
  if (params.guidance_scale !== undefined) details.push(`guidance ${params.guidance_scale}`);
  if (params.strength !== undefined) details.push(`strength ${params.strength}`);
  $('.meta', card).textContent = details.join(' · ');
  if (params.negative_prompt) $('.meta', card).title = `Negative prompt: ${params.negative_prompt}`;
  const download = $('.download', card);
  download.href = url;
  download.download = `zimage-${event.seed}.${event.output_format === 'jpeg' ? 'jpg' : event.output_format}`;
  $('.reuse', card).addEventListener('click', () => reuseSeed(task, event.seed));
  $('.card-actions', card).hidden = false;
  card.dataset.seed = event.seed;
}

// Send one request (built fresh each try, so it can be retried after asking for a key) and
// follow its event stream into the progress bar and the gallery.
async function runTask(form, task, url, build) {
  if (form.abort) {
    form.abort.abort(); // the button doubles as Stop while running
    return;
  }
  clearError(form);
  let built;
  try {
    built = await build();
  } catch (error) {
    showError(form, error.message, error.param);
    return;
  }
  const { body, params } = built;
  const run = $('[data-run]', form);
  const label = run.textContent;
  const abort = new AbortController();
  form.abort = abort;
  run.textContent = 'Stop';
  $('.progress', form).hidden = false;
  setProgress(form, 0, 'Queued…');
  // Newest first in the gallery, and image 0 of this run leftmost.
  const cards = [];
  for (let i = params.n - 1; i >= 0; i -= 1) cards[i] = newCard(task, params, i);
  cards[0].scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  let completed = 0;
  try {
    const response = await request(url, { method: 'POST', body, signal: abort.signal,
      headers: typeof body === 'string' ? { 'Content-Type': 'application/json' } : {} });
    for await (const { event, data } of serverSentEvents(response)) {
      if (event.endsWith('.progress')) {
        const pass = data.image_indices.length < params.n
          ? ` (images ${data.image_indices[0] + 1}–${data.image_indices.at(-1) + 1} of ${params.n})` : '';
        setProgress(form, data.progress, `Step ${data.step} of ${data.total}${pass}`);
        for (const i of data.image_indices) $('.meta', cards[i]).textContent = `Step ${data.step} of ${data.total}`;
      } else if (event.endsWith('.partial_image')) {
        showPreview(cards[data.index], data.b64_json, data.output_format);
      } else if (event.endsWith('.completed')) {
        finishCard(cards[data.index], task, params, data);
        completed += 1;
      } else if (event === 'error') {
        throw new ApiError(data.error.message, data.error.param);
      }
    }
    if (completed < params.n) throw new Error('The server closed the stream before every image arrived.');
    setProgress(form, 1, params.n === 1 ? 'Done' : `Done: ${params.n} images`);
  } catch (error) {
    if (error instanceof AuthNeeded) {
      askForKey(() => runTask(form, task, url, build));
    } else if (abort.signal.aborted) {
      setProgress(form, 0, 'Stopped');
    } else {
      const message = error instanceof TypeError ? `Could not reach the server (${error.message}).` : error.message;
      showError(form, message, error.param);
    }
    for (const card of cards) if (card.classList.contains('pending')) card.remove();
    $('#gallery-empty').hidden = $('#gallery').children.length > 0;
    if (!abort.signal.aborted) $('.progress', form).hidden = true;
  } finally {
    form.abort = null;
    run.textContent = label;
  }
}

// ---- Generate ----------------------------------------------------------------------------

$('#generate-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  runTask(form, 'generate', 'v1/images/generations', async () => {
    const prompt = $('#gen-prompt').value.trim();
    if (!prompt) throw new ApiError('Write a prompt first.', 'prompt');
    const params = { prompt, size: chosenSize(), ...commonFields(form) };
    const negative = $('#gen-negative').value.trim();
    if (negative) params.negative_prompt = negative;
    const body = JSON.stringify({ ...params, stream: true, partial_images: PARTIAL_IMAGES });
    return { body, params };
  });
});

// ---- Edit: the input image and the mask brush -----------------------------------------------

const edit = {
  file: null,
  width: 0,
  height: 0,
  painted: false,
  last: null,
};
const imageCanvas = $('#edit-image');
const maskCanvas = $('#edit-mask');

function loadEditImage(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    edit.file = file;
    edit.width = img.naturalWidth;
    edit.height = img.naturalHeight;
    for (const canvas of [imageCanvas, maskCanvas]) {
      canvas.width = edit.width;
      canvas.height = edit.height;
    }
    imageCanvas.getContext('2d').drawImage(img, 0, 0);
    clearMask();
    $('#edit-canvas-wrap').hidden = false;
    $('#edit-brush').hidden = false;
    $('#edit-drop').classList.add('compact');
    $('.dropzone-text', $('#edit-drop')).innerHTML = `<strong>${escapeHtml(file.name)}</strong> · ${edit.width}×${edit.height} → ${editSize().replace('x', '×')} · change`;
    clearError($('#edit-form'));
    URL.revokeObjectURL(url);
  };
  img.onerror = () => showError($('#edit-form'), `${file.name} is not an image this browser can read (use PNG, JPEG or WebP).`);
  img.src = url;
}

function escapeHtml(text) {
  const span = document.createElement('span');
  span.textContent = text;
  return span.innerHTML;
}

function clearMask() {
  maskCanvas.getContext('2d').clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  edit.painted = false;
}

function removeEditImage() {
  edit.file = null;
  $('#edit-file').value = '';
  $('#edit-canvas-wrap').hidden = true;
  $('#edit-brush').hidden = true;
  $('#edit-drop').classList.remove('compact');
  $('.dropzone-text', $('#edit-drop')).innerHTML = '<strong>Choose an image</strong> or drop it here';
}

// The output keeps the input's aspect, scaled to about a megapixel, sides snapped to 16.
function editSize() {
  const scale = Math.min(1, Math.sqrt(EDIT_MAX_PIXELS / (edit.width * edit.height)));
  const snap = (side) => Math.max(64, Math.floor((side * scale) / 16) * 16);
  return `${snap(edit.width)}x${snap(edit.height)}`;
}

function canvasPoint(event) {
  const rect = maskCanvas.getBoundingClientRect();
  const scale = maskCanvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
}

function paintTo(point) {
  const ctx = maskCanvas.getContext('2d');
  ctx.strokeStyle = ctx.fillStyle = '#ff3d6e';
  ctx.lineCap = ctx.lineJoin = 'round';
  ctx.lineWidth = Number($('#edit-brush-size').value) * point.scale;
  ctx.beginPath();
  const from = edit.last || point;
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(point.x + 0.01, point.y);
  ctx.stroke();
  edit.last = point;
  edit.painted = true;
}

maskCanvas.addEventListener('pointerdown', (event) => {
  event.preventDefault();
  maskCanvas.setPointerCapture(event.pointerId);
  edit.last = null;
  paintTo(canvasPoint(event));
});
maskCanvas.addEventListener('pointermove', (event) => {
  if (edit.last && maskCanvas.hasPointerCapture(event.pointerId)) paintTo(canvasPoint(event));
});
for (const type of ['pointerup', 'pointercancel']) maskCanvas.addEventListener(type, () => { edit.last = null; });

// OpenAI's mask convention: fully transparent where the image should change, opaque elsewhere.
function maskBlob() {
  const out = document.createElement('canvas');
  out.width = edit.width;
  out.height = edit.height;
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = 'destination-out';
  ctx.drawImage(maskCanvas, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, 'image/png'));
}

$('#edit-file').addEventListener('change', (event) => loadEditImage(event.target.files[0]));
$('#edit-clear-mask').addEventListener('click', clearMask);
$('#edit-remove').addEventListener('click', removeEditImage);
const drop = $('#edit-drop');
for (const type of ['dragenter', 'dragover']) {
  drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add('dragging'); });
}
for (const type of ['dragleave', 'drop']) drop.addEventListener(type, () => drop.classList.remove('dragging'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  loadEditImage(event.dataTransfer.files[0]);
});
$('#edit-strength').addEventListener('input', (event) => {
  $('#edit-strength-value').textContent = Number(event.target.value).toFixed(2);
});

$('#edit-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  runTask(form, 'edit', 'v1/images/edits', async () => {
    if (!edit.file) throw new ApiError('Choose an image to edit first.', 'image');
    const prompt = $('#edit-prompt').value.trim();
    if (!prompt) throw new ApiError('Write a prompt first.', 'prompt');
    const params = { prompt, size: editSize(), strength: Number($('#edit-strength').value), ...commonFields(form) };
    const negative = $('#edit-negative').value.trim();
    if (negative) params.negative_prompt = negative;
    const body = new FormData();
    body.append('image', edit.file, edit.file.name);
    if (edit.painted) body.append('mask', await maskBlob(), 'mask.png');
    for (const [name, value] of Object.entries(params)) body.append(name, String(value));
    body.append('stream', 'true');
    body.append('partial_images', String(PARTIAL_IMAGES));
    return { body, params };
  });
});

// Ctrl+Enter (Cmd+Enter on a Mac) in a prompt runs its form.
for (const textarea of $$('form.task textarea')) {
  textarea.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      textarea.form.requestSubmit();
    }
  });
}

loadModel();
