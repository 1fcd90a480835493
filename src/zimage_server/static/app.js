// The zimage-server page: plain JavaScript, no build step, no network beyond this server.
// It speaks the public API: POST v1/images/generations (JSON) and v1/images/edits (multipart),
// relative to the page (so it also works behind a proxy that mounts the server under a prefix),
// both with stream=true, and reads the server-sent events as they arrive. The gallery is the
// server's image history (GET v1/images, DELETE v1/images/{id}), so it survives a reload.
'use strict';

const KEY_STORAGE = 'zimage.apiKey';
const PARTIAL_IMAGES = 2;
const EDIT_MAX_PIXELS = 1024 * 1024; // edits are sized like the input, scaled to about 1 megapixel
const HISTORY_PAGE_SIZE = 24; // kept images per GET v1/images page; ?page_size=N (1-100) overrides it
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

// An error the server explained: its message, the request field it blames and its code, if any.
class ApiError extends Error {
  constructor(message, param = null, code = null) {
    super(message);
    this.param = param;
    this.code = code;
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
    if (error && error.message) return new ApiError(error.message, error.param, error.code);
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
  // Several requests can be refused at once (the model and the history, on load): retry them all.
  const earlier = state.afterKey;
  state.afterKey = earlier && retry ? () => { earlier(); retry(); } : retry || earlier;
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
  // A key given unasked may be someone else's: the history shown must be that key's.
  if (retry) retry();
  else reloadHistory();
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

// "Use these settings": the form of the task that made the image, refilled with what made it.
// An edit's input image is not kept, so the Edit tab gets everything but the image.
function useSettings(settings) {
  const { task } = settings;
  reuseSeed(task, settings.seed);
  const form = $(`#${task}-form`);
  $('textarea[name="prompt"]', form).value = settings.prompt;
  $('textarea[name="negative_prompt"]', form).value = settings.negative_prompt || '';
  // Empty where the record has no value: the server then uses the model's default.
  $('[data-field="num_inference_steps"]', form).value = settings.num_inference_steps ?? '';
  $('[data-field="guidance_scale"]', form).value = settings.guidance_scale ?? '';
  if (task === 'generate') chooseSizeOf(settings.width, settings.height);
  if (task === 'edit' && settings.strength != null) {
    $('#edit-strength').value = settings.strength;
    $('#edit-strength').dispatchEvent(new Event('input')); // its label follows
  }
  updateNegativeHints();
  $('textarea[name="prompt"]', form).focus();
}

// The preset of that size if there is one, else Custom with the two sides filled in.
function chooseSizeOf(width, height) {
  $('#gen-width').value = width;
  $('#gen-height').value = height;
  const button = $(`#gen-size-presets [data-size="${width}x${height}"]`) || $('#gen-size-presets [data-size="custom"]');
  if (button) chooseSize(button);
}

// ---- tabs --------------------------------------------------------------------------------

function showTab(task) {
  for (const tab of $$('[role="tab"]')) {
    const selected = tab.id === `tab-${task}`;
    tab.setAttribute('aria-selected', String(selected));
    $(`#${tab.getAttribute('aria-controls')}`).hidden = !selected;
  }
}
// ---- the prompt enhancer: shows the expansion in the prompt box before generating -------------

async function enhancePrompt() {
  const form = $('#generate-form');
  const box = $('#gen-prompt');
  const button = $('#gen-enhance');
  const status = $('#gen-enhance-status');
  if (!box.value.trim()) {
    showError(form, 'Write a prompt to enhance first.', 'prompt');
    return;
  }
  clearError(form);
  button.disabled = true;
  status.textContent = 'Enhancing…';
  try {
    const response = await request('v1/prompts/enhance', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: box.value }),
    });
    const result = await response.json();
    if (result.revised_prompt) {
      box.value = result.revised_prompt;
      status.textContent = 'Enhanced: edit it, or generate.';
    } else {
      status.textContent = `Kept as written (${(result.fallback || 'no change').replace('_', ' ')}).`;
    }
  } catch (error) {
    status.textContent = '';
    if (error instanceof AuthNeeded) askForKey(enhancePrompt);
    else showError(form, error.message, error.param);
  } finally {
    button.disabled = false;
  }
}

$('#gen-enhance').addEventListener('click', enhancePrompt);

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
  updateEmpty();
  return card;
}

function updateEmpty() {
  $('#gallery-empty').hidden = $('#gallery').children.length > 0;
}

function showPreview(card, b64, format) {
  $('img', card).src = `data:image/${format};base64,${b64}`;
  card.classList.add('previewing');
}

// A streamed image arrived: the card shows it, and gets its actions. The id (absent when the
// server keeps no images) is what makes it deletable.
function finishCard(card, task, params, event) {
  const type = `image/${event.output_format}`;
  const url = URL.createObjectURL(b64ToBlob(event.b64_json, type));
  const [width, height] = event.size.split('x').map(Number);
  card.classList.remove('pending', 'previewing');
  // What was sent, so the prompt keeps any <lora:...> tags it was written with.
  fillCard(card, {
    task, prompt: params.prompt, negative_prompt: params.negative_prompt, width, height, seed: event.seed,
    num_inference_steps: params.num_inference_steps, guidance_scale: params.guidance_scale, strength: params.strength,
  }, { url, format: event.output_format, id: event.id });
}

// A card for a kept image, from its GET v1/images record: its signed url opens without a key.
function storedCard(record) {
  const card = $('#card').content.firstElementChild.cloneNode(true);
  card.dataset.history = '';
  const settings = storedSettings(record);
  $('.prompt', card).textContent = record.prompt;
  $('.frame', card).style.aspectRatio = `${settings.width} / ${settings.height}`;
  $('img', card).loading = 'lazy'; // a page of full-size images is a lot to fetch at once
  fillCard(card, settings, { url: record.url, format: record.output_format, id: record.id, expiresAt: record.expires_at });
  $('.meta', card).title = [`Made ${new Date(record.created_at * 1000).toLocaleString()}`, $('.meta', card).title]
    .filter(Boolean).join('\n');
  return card;
}

// The form fields a record's parameters stand for. The server keeps the prompt without its
// <lora:name:scale> tags and the LoRAs beside it: put them back as tags, which the form sends.
function storedSettings(record) {
  const p = record.parameters;
  const tags = (p.loras || []).map((lora) => ` <lora:${lora.name}:${lora.scale}>`).join('');
  const edit = record.route.endsWith('/edits') || ['img2img', 'inpaint'].includes(p.mode);
  return {
    task: edit ? 'edit' : 'generate', prompt: record.prompt + tags, negative_prompt: record.negative_prompt,
    width: p.width, height: p.height, seed: p.seed, num_inference_steps: p.num_inference_steps,
    guidance_scale: p.guidance_scale, strength: edit ? p.strength : undefined,
  };
}

function fillCard(card, settings, { url, format, id, expiresAt }) {
  const img = $('img', card);
  img.src = url;
  img.alt = settings.prompt;
  const details = [`${settings.width}×${settings.height}`, `seed ${settings.seed}`];
  if (settings.num_inference_steps) details.push(`${settings.num_inference_steps} steps`);
  if (settings.guidance_scale != null) details.push(`guidance ${settings.guidance_scale}`);
  if (settings.strength != null) details.push(`strength ${settings.strength}`);
  $('.meta', card).textContent = details.join(' · ');
  if (settings.negative_prompt) $('.meta', card).title = `Negative prompt: ${settings.negative_prompt}`;
  const download = $('.download', card);
  download.href = url;
  download.download = `zimage-${settings.seed}.${format === 'jpeg' ? 'jpg' : format}`;
  $('.reuse', card).addEventListener('click', () => reuseSeed(settings.task, settings.seed));
  $('.use-settings', card).addEventListener('click', () => useSettings(settings));
  if (id) {
    card.dataset.id = id;
    const remove = $('.delete', card);
    remove.setAttribute('aria-label', `Delete the image “${settings.prompt.slice(0, 80)}”`);
    remove.addEventListener('click', () => deleteCard(card));
    remove.hidden = false;
  }
  if (expiresAt) keepLinkFresh(card, expiresAt);
  $('.card-actions', card).hidden = false;
  card.dataset.seed = settings.seed;
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
    updateEmpty();
    if (!abort.signal.aborted) $('.progress', form).hidden = true;
  } finally {
    form.abort = null;
    run.textContent = label;
  }
}

// ---- the history: kept images, newest first, page by page, deletable -----------------------

// `kept`, not `history`: that name is the browser's own (window.history).
const kept = {
  pageSize: pageSizeFromUrl(),
  hasMore: false,
  off: false, // the server keeps no images (503 store_unavailable): the gallery is this session's only
  loading: false,
  generation: 0, // bumped by a reload, so a page asked for with the previous key is dropped
};

function pageSizeFromUrl() {
  const asked = Number(new URLSearchParams(location.search).get('page_size'));
  return Number.isInteger(asked) && asked >= 1 && asked <= 100 ? asked : HISTORY_PAGE_SIZE;
}

// The cursor is the oldest image shown, not the last page's last_id: that one may have been
// deleted since, and the server refuses a cursor it no longer has.
function oldestShownId() {
  const shown = $$('#gallery .card[data-id]');
  return shown.length ? shown.at(-1).dataset.id : null;
}

async function loadHistory() {
  if (kept.loading || kept.off) return;
  const { generation } = kept;
  kept.loading = true;
  $('#load-older').disabled = true;
  $('#gallery').setAttribute('aria-busy', 'true');
  $('#history-error').hidden = true;
  const query = new URLSearchParams({ limit: String(kept.pageSize) });
  const after = oldestShownId();
  if (after) query.set('after', after);
  let page = null;
  let failure = null;
  try {
    page = await (await request(`v1/images?${query}`)).json();
  } catch (error) {
    failure = error;
  }
  if (generation !== kept.generation) return; // reloadHistory has started over
  kept.loading = false;
  $('#gallery').setAttribute('aria-busy', 'false');
  if (failure) historyFailed(failure);
  else showHistoryPage(page);
  $('#load-older').disabled = false;
  $('#load-older').hidden = !kept.hasMore;
  updateEmpty();
  // After a failure only the button tries again: scrolling must not hammer a failing server.
  watchLoadOlder(kept.hasMore && !failure);
}

function showHistoryPage(page) {
  const gallery = $('#gallery');
  // Images of this session may already be shown (streamed before the page arrived): not twice.
  for (const record of page.data) {
    if (!gallery.querySelector(`.card[data-id="${CSS.escape(record.id)}"]`)) gallery.append(storedCard(record));
  }
  kept.hasMore = page.has_more;
}

function historyFailed(error) {
  if (error instanceof AuthNeeded) {
    askForKey(loadHistory);
  } else if (error.code === 'store_unavailable') {
    kept.off = true; // not a fault to show: the gallery is what this session makes, as before
    kept.hasMore = false;
  } else {
    const message = error instanceof TypeError ? `could not reach the server (${error.message})` : error.message;
    $('#history-error').textContent = `Could not load earlier images: ${message}`;
    $('#history-error').hidden = false;
  }
}

// After a new key: that key's images, from the top. Cards still being made stay.
function reloadHistory() {
  kept.generation += 1;
  kept.loading = false;
  kept.off = false;
  kept.hasMore = false;
  for (const card of $$('#gallery .card:not(.pending)')) card.remove();
  loadHistory();
}

// Scrolling to the bottom loads the next page, as the button does. Observing afresh after each
// page reports where the button is now, so a page too short to fill the screen loads the next.
const loadOlderObserver = 'IntersectionObserver' in window
  ? new IntersectionObserver((entries) => {
    if (entries.some((entry) => entry.isIntersecting) && kept.hasMore) loadHistory();
  }, { rootMargin: '200px' })
  : null;

function watchLoadOlder(watch) {
  if (!loadOlderObserver) return;
  loadOlderObserver.unobserve($('#load-older'));
  if (watch) loadOlderObserver.observe($('#load-older'));
}

$('#load-older').addEventListener('click', loadHistory);

// The card goes only once the server has deleted the image; otherwise it stays, saying why.
async function deleteCard(card) {
  const button = $('.delete', card);
  const problem = $('.card-error', card);
  button.disabled = true;
  problem.hidden = true;
  try {
    await request(`v1/images/${encodeURIComponent(card.dataset.id)}`, { method: 'DELETE' });
  } catch (error) {
    // Already gone (deleted elsewhere, or by retention): what the click asked for is done.
    if (error.code !== 'image_not_found') return failDelete(card, button, problem, error);
  }
  const { href } = $('.download', card);
  if (href.startsWith('blob:')) URL.revokeObjectURL(href);
  card.remove();
  updateEmpty();
}

function failDelete(card, button, problem, error) {
  button.disabled = false;
  if (error instanceof AuthNeeded) return askForKey(() => deleteCard(card));
  const message = error instanceof TypeError ? `could not reach the server (${error.message})` : error.message;
  problem.textContent = `Not deleted: ${message}`;
  problem.hidden = false;
}

// A kept image's signed link expires (Z_IMAGE_URL_TTL_S, an hour by default). A page left open
// longer gets a fresh one (GET v1/images/{id}) when the image fails to load or is downloaded.
function keepLinkFresh(card, expiresAt) {
  card.dataset.expiresAt = expiresAt;
  $('img', card).addEventListener('error', () => {
    if (linkStale(card)) refreshLink(card);
  });
  $('.download', card).addEventListener('click', async (event) => {
    if (!linkStale(card)) return;
    event.preventDefault();
    if (await refreshLink(card)) $('.download', card).click();
  });
}

// Near its expiry by this browser's clock, and not refreshed in the last minute: a clock that
// disagrees with the server's, or a very short TTL, must not make it ask again and again.
function linkStale(card) {
  const now = Date.now() / 1000;
  return now >= Number(card.dataset.expiresAt) - 30 && now - Number(card.dataset.refreshedAt || 0) > 60;
}

async function refreshLink(card) {
  card.dataset.refreshedAt = Date.now() / 1000;
  try {
    const record = await (await request(`v1/images/${encodeURIComponent(card.dataset.id)}`)).json();
    card.dataset.expiresAt = record.expires_at;
    $('img', card).src = record.url;
    $('.download', card).href = record.url;
    return true;
  } catch (_) {
    return false; // gone or unreachable: the card shows the broken image, which says as much
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
loadHistory();
