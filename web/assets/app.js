// vmm-web: the page. Plain JavaScript, no libraries, nothing from the
// internet. The guest list arrives by server-sent events (/api/events);
// actions are POSTs that carry the session's CSRF token.
'use strict';

const S = {
  session: null,      // /api/session: csrf_token, reboot_supported, ...
  snapshot: null,     // the last /api/events snapshot
  route: null,        // {view: 'list'|'guest'|'cluster', name}
  view: null,         // the current view object (update/leave)
};

// ---------- helpers ----------

function h(tag, attrs, ...children) {
  const svg = ['svg', 'polyline', 'line', 'text', 'rect', 'path', 'g'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.setAttribute('class', v);
    else if (k in el && !svg && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n < 10 ? n.toFixed(1) : n.toFixed(0)) + ' ' + units[i];
}

function rate(n) {
  return n === null || n === undefined ? '–' : bytes(n) + '/s';
}

function duration(s) {
  if (s === null || s === undefined) return '–';
  const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60), sec = Math.floor(s % 60);
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${m}m`;
  if (m) return `${m}m ${sec}s`;
  return `${sec}s`;
}

function ms(n) {
  if (n === null || n === undefined) return '–';
  return n >= 10000 ? (n / 1000).toFixed(1) + ' s' : n + ' ms';
}

function notify(text, kind) {
  const box = document.getElementById('messages');
  const item = h('div', { class: 'msg msg-' + (kind || 'info') },
    h('span', {}, text),
    h('button', { class: 'close', type: 'button', title: 'dismiss', onclick: () => item.remove() }, '×'));
  box.append(item);
  // Errors stay until dismissed: nothing fails silently.
  if (kind !== 'error') setTimeout(() => item.remove(), 8000);
  while (box.children.length > 6) box.firstChild.remove();
}

// Calls the console's own API; throws an Error with the server's words.
async function api(method, path, body) {
  const headers = { 'Accept': 'application/json' };
  if (method !== 'GET') {
    headers['X-CSRF-Token'] = (S.session && S.session.csrf_token) || '';
    headers['Content-Type'] = 'application/json';
  }
  let res;
  try {
    res = await fetch(path, {
      method, headers, credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new Error('vmm-web does not answer: ' + e.message);
  }
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) {
    if (res.status === 401) location.href = '/login';
    throw new Error((data && data.error) || `HTTP ${res.status}`);
  }
  return data;
}

// Runs an action; reports its outcome in words.
async function act(button, method, path, body) {
  if (button) button.disabled = true;
  try {
    const r = await api(method, path, body);
    notify((r && r.message) || 'done', 'ok');
    return r;
  } catch (e) {
    notify(e.message, 'error');
    return null;
  } finally {
    if (button) button.disabled = false;
  }
}

function stateBadge(state) {
  return h('span', { class: 'state state-' + state }, state);
}

// ---------- charts (SVG) ----------

// A line chart of one or more series over the samples' times.
function chart(samples, series, opts) {
  const w = opts.w, ht = opts.h, pad = opts.small ? 1 : 14;
  const svg = h('svg', {
    class: 'chart' + (opts.small ? ' spark' : ''), viewBox: `0 0 ${w} ${ht}`,
    width: w, height: ht, role: 'img', 'aria-label': opts.label || '',
  });
  let max = opts.max || 0;
  for (const s of series) for (const p of samples) {
    const v = s.get(p);
    if (v !== null && v !== undefined && v > max) max = v;
  }
  // Headroom above the highest point, so a flat line is not the border.
  max = max ? max * 1.15 : 1;
  const n = samples.length;
  const x = (i) => n <= 1 ? w : (i / (n - 1)) * (w - 2) + 1;
  const y = (v) => ht - pad / 2 - (v / max) * (ht - pad * 1.2);
  if (!opts.small) {
    svg.append(h('line', { x1: 0, y1: y(0), x2: w, y2: y(0), class: 'axis' }));
    svg.append(h('line', { x1: 0, y1: y(max), x2: w, y2: y(max), class: 'grid' }));
    svg.append(h('text', { x: 2, y: 10, class: 'chart-label' }, opts.format(max)));
  }
  for (const s of series) {
    const pts = [];
    samples.forEach((p, i) => {
      const v = s.get(p);
      if (v !== null && v !== undefined) pts.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
    });
    if (pts.length) svg.append(h('polyline', { points: pts.join(' '), class: 'line ' + s.cls }));
  }
  if (!opts.small && n) {
    const last = series.map((s) => s.get(samples[n - 1])).filter((v) => v !== null && v !== undefined);
    svg.append(h('text', { x: w - 2, y: 10, class: 'chart-label', 'text-anchor': 'end' },
      last.map(opts.format).join(' / ')));
  }
  return svg;
}

const SERIES = {
  cpu: { get: (p) => p.cpu, cls: 's-cpu' },
  rss: { get: (p) => p.rss_mib, cls: 's-rss' },
  pss: { get: (p) => p.pss_mib, cls: 's-pss' },
  disk: { get: (p) => p.disk_bps, cls: 's-disk' },
  net: { get: (p) => p.net_bps, cls: 's-net' },
};
const pct = (v) => v.toFixed(1) + '%';
const mib = (v) => v.toFixed(0) + ' MiB';

// ---------- the guest list ----------

function memoryCell(g) {
  const m = g.memory;
  const parts = [h('div', {}, h('b', {}, bytes(m.configured_bytes)), ' configured')];
  if (g.balloon) {
    parts.push(h('div', { class: 'muted' },
      'balloon ', bytes(m.balloon_target_bytes), ' (holds ', bytes(m.balloon_actual_bytes), ')'));
  }
  parts.push(h('div', { class: 'muted' }, 'RSS ', bytes(m.rss_bytes), ' · PSS ', bytes(m.pss_bytes)));
  if (m.ksm_merging_pages) parts.push(h('div', { class: 'muted' }, 'KSM ', bytes(m.ksm_merging_pages * 4096), ' shared'));
  return parts;
}

function devicesCell(list, kind) {
  if (!list.length) return h('span', { class: 'muted' }, 'none');
  return list.map((d) => kind === 'disk'
    ? h('div', { class: 'dev' }, h('b', {}, d.id), ' ↓', rate(d.read_bps), ' ↑', rate(d.write_bps))
    : h('div', { class: 'dev' }, h('b', {}, d.id), ' rx ', rate(d.rx_bps), ' tx ', rate(d.tx_bps)));
}

function pauseButton(g) {
  if (g.state === 'running') {
    return h('button', {
      type: 'button', class: 'small', 'data-action': 'pause',
      onclick: (e) => act(e.target, 'POST', `/api/guests/${encodeURIComponent(g.name)}/pause`),
    }, 'Pause');
  }
  if (g.state === 'paused') {
    return h('button', {
      type: 'button', class: 'small', 'data-action': 'resume',
      onclick: (e) => act(e.target, 'POST', `/api/guests/${encodeURIComponent(g.name)}/resume`),
    }, 'Resume');
  }
  return null;
}

function migrationBadge(g) {
  const m = g.migration;
  if (!m || !['setup', 'active', 'switch-over'].includes(m.phase)) return null;
  return h('div', { class: 'muted' }, 'migrating ', (m.progress_percent || 0).toFixed(0), '%');
}

class ListView {
  constructor(main) {
    this.rows = new Map();
    this.tbody = h('tbody', {});
    this.empty = h('p', { class: 'muted', id: 'no-guests', hidden: true });
    this.error = h('p', { class: 'error-box', hidden: true });
    this.departed = h('div', {});
    main.replaceChildren(
      h('h1', {}, 'Guests'),
      this.error,
      h('table', { class: 'guests', id: 'guests' },
        h('thead', {}, h('tr', {},
          ['Name', 'State', 'vCPUs', 'Memory', 'Uptime', 'CPU', 'Disks', 'NICs', 'Charts', ''].map((t) => h('th', {}, t)))),
        this.tbody),
      h('p', { class: 'muted legend' }, 'Charts, over the last minutes: ',
        h('span', { class: 'k-cpu' }, 'CPU'), ' · ', h('span', { class: 'k-rss' }, 'RSS'), ' · ',
        h('span', { class: 'k-disk' }, 'disk'), ' and ', h('span', { class: 'k-net' }, 'NIC'), ' I/O.'),
      this.empty, this.departed);
  }

  update(snap) {
    this.error.hidden = !snap.error;
    this.error.textContent = snap.error || '';
    this.empty.hidden = snap.guests.length > 0;
    this.empty.textContent = `No VMM sockets in ${snap.socket_dir}.`;
    const seen = new Set();
    for (const g of snap.guests) {
      seen.add(g.name);
      let row = this.rows.get(g.name);
      if (!row) {
        row = h('tr', { 'data-guest': g.name });
        row.cells_ = {};
        for (const k of ['name', 'state', 'vcpus', 'memory', 'uptime', 'cpu', 'disks', 'nets', 'charts', 'actions']) {
          row.cells_[k] = h('td', { class: 'c-' + k });
          row.append(row.cells_[k]);
        }
        row.cells_.name.append(h('a', { href: '#/guest/' + encodeURIComponent(g.name) }, g.name));
        this.rows.set(g.name, row);
      }
      const c = row.cells_;
      c.state.replaceChildren(stateBadge(g.state), migrationBadge(g) || '',
        g.error ? h('div', { class: 'error-text' }, g.error) : '');
      c.vcpus.textContent = g.vcpus ?? '–';
      c.memory.replaceChildren(...memoryCell(g));
      c.uptime.textContent = duration(g.uptime_s);
      c.cpu.textContent = g.cpu_percent === null ? '–' : pct(g.cpu_percent);
      c.disks.replaceChildren(...[devicesCell(g.disks, 'disk')].flat());
      c.nets.replaceChildren(...[devicesCell(g.nets, 'net')].flat());
      c.charts.replaceChildren(
        h('span', { class: 'spark-box', title: 'CPU, % of one core' }, chart(g.history, [SERIES.cpu], { w: 90, h: 22, small: true, max: 5 })),
        h('span', { class: 'spark-box', title: 'RSS' }, chart(g.history, [SERIES.rss], { w: 90, h: 22, small: true })),
        h('span', { class: 'spark-box', title: 'disk and NIC I/O' }, chart(g.history, [SERIES.disk, SERIES.net], { w: 90, h: 22, small: true })));
      // Only swap the button when the state changed, so a click is not lost.
      const want = g.state === 'running' ? 'pause' : g.state === 'paused' ? 'resume' : '';
      if (c.actions.dataset.want !== want) {
        c.actions.dataset.want = want;
        c.actions.replaceChildren(pauseButton(g) || '');
      }
      this.tbody.append(row); // keeps the snapshot's (name) order
    }
    for (const [name, row] of this.rows) {
      if (!seen.has(name)) { row.remove(); this.rows.delete(name); }
    }
    this.departed.replaceChildren(...(snap.departed || []).map((d) => h('p', { class: 'muted' },
      `${d.name} left this host: migration ${d.migration.phase}`,
      d.migration.destination ? ` to ${d.migration.destination}` : '',
      d.migration.phase === 'completed' ? ` (downtime ${ms(d.migration.downtime_ms)}, ${bytes(d.migration.transferred_bytes)} sent)` : '',
      d.migration.error ? `: ${d.migration.error}` : '')));
  }
}

// ---------- one guest ----------

function stripTerminal(text) {
  // Drop ANSI escape sequences and carriage returns; the view is a log.
  return text.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, '').replace(/\x1b[@-Z\\-_]/g, '').replace(/\r(?!\n)/g, '').replace(/\r\n/g, '\n');
}

class GuestView {
  constructor(main, name) {
    this.name = name;
    this.base = '/api/guests/' + encodeURIComponent(name);
    this.consoleNext = 0;
    this.consoleText = '';
    this.timers = [];
    this.build(main);
    this.pollConsole();
    this.refreshDetail();
    this.timers.push(setInterval(() => this.refreshDetail(), 3000));
  }

  leave() {
    this.left = true;
    for (const t of this.timers) clearInterval(t);
    clearTimeout(this.consoleTimer);
  }

  build(main) {
    const name = this.name;
    const btn = (action, label, opts) => h('button', Object.assign({
      type: 'button', 'data-action': action, id: 'act-' + action,
      onclick: (e) => this.action(e.target, action),
    }, opts || {}), label);
    this.head = h('div', { class: 'guest-head' });
    this.buttons = {
      pause: btn('pause', 'Pause'),
      resume: btn('resume', 'Resume'),
      shutdown: btn('shutdown', 'Shut down', { title: 'ACPI power button; the guest decides' }),
      stop: btn('stop', 'Force stop', { class: 'danger', title: 'stops the vCPUs now, like pulling the plug' }),
      reboot: btn('reboot', 'Reboot'),
    };
    if (!S.session || !S.session.reboot_supported) {
      this.buttons.reboot.hidden = true;
    }
    this.charts = h('div', { class: 'charts' });
    this.memory = h('div', {});
    this.balloonInput = h('input', { type: 'number', min: 0, step: 1, id: 'balloon-mib', placeholder: 'MiB' });
    this.balloonForm = h('form', { class: 'inline', onsubmit: (e) => { e.preventDefault(); this.setBalloon(); } },
      h('label', {}, 'Balloon target ', this.balloonInput, ' MiB taken back from the guest '),
      h('button', { type: 'submit', id: 'balloon-set' }, 'Set'));
    this.migDest = h('input', { id: 'mig-dest', placeholder: 'tcp:HOST:PORT', size: 26, required: true });
    this.migToken = h('input', { id: 'mig-token', placeholder: '/etc/vmm/migration.token', size: 30, required: true });
    this.migDowntime = h('input', { id: 'mig-downtime', type: 'number', min: 1, value: 300, size: 6 });
    this.migBandwidth = h('input', { id: 'mig-bandwidth', type: 'number', min: 1, size: 6, placeholder: 'unlimited' });
    this.migStart = h('button', { type: 'submit', id: 'mig-start' }, 'Migrate');
    this.migCancel = h('button', { type: 'button', id: 'mig-cancel', hidden: true, onclick: (e) => this.action(e.target, 'migrate-cancel') }, 'Cancel migration');
    this.migProgress = h('progress', { id: 'mig-progress', max: 100, value: 0, hidden: true });
    this.migPhase = h('span', { id: 'mig-phase', class: 'phase' });
    this.migFigures = h('div', { id: 'mig-figures', class: 'figures' });
    const migForm = h('form', { class: 'mig-form', onsubmit: (e) => { e.preventDefault(); this.migrate(); } },
      h('label', {}, 'Destination ', this.migDest),
      h('label', {}, 'Token file (on this host) ', this.migToken),
      h('label', {}, 'Max downtime ', this.migDowntime, ' ms'),
      h('label', {}, 'Bandwidth ', this.migBandwidth, ' MiB/s'),
      this.migStart, this.migCancel);
    this.consoleOut = h('pre', { id: 'console-output', class: 'console', tabindex: 0 });
    this.consoleStatus = h('div', { id: 'console-status', class: 'muted' });
    this.typing = h('input', { type: 'checkbox', id: 'console-typing', onchange: () => this.toggleTyping() });
    this.consoleInput = h('input', { id: 'console-input', placeholder: 'a line for the guest; Enter sends it', size: 60, autocomplete: 'off' });
    this.consoleForm = h('form', { class: 'inline', hidden: true, onsubmit: (e) => { e.preventDefault(); this.type(); } },
      this.consoleInput, h('button', { type: 'submit', id: 'console-send' }, 'Send'),
      h('button', { type: 'button', class: 'small', onclick: () => this.sendRaw('\x03') }, 'Ctrl-C'));
    this.devices = h('div', {});
    this.counters = h('div', {});
    this.config = h('pre', { class: 'config', id: 'config' });
    this.detailErrors = h('div', {});
    main.replaceChildren(
      h('p', {}, h('a', { href: '#/' }, '← all guests')),
      this.head,
      h('div', { class: 'actions' }, ...Object.values(this.buttons)),
      h('section', {}, h('h2', {}, 'Activity'), this.charts),
      h('section', {}, h('h2', {}, 'Memory'), this.memory, this.balloonForm),
      h('section', { id: 'migration' }, h('h2', {}, 'Live migration'),
        h('p', { class: 'muted' }, 'The destination VMM must be waiting: ',
          h('code', {}, 'vmm --incoming tcp:0.0.0.0:PORT --migration-token-file FILE …'),
          '. A guest the cluster manages should be moved from the Cluster page instead.'),
        migForm, h('div', { class: 'mig-status' }, this.migProgress, this.migPhase), this.migFigures),
      h('section', {}, h('h2', {}, 'Serial console'), this.consoleStatus,
        this.consoleOut,
        h('label', { class: 'typing' }, this.typing, ' Allow typing (off: the view is read-only)'),
        this.consoleForm),
      h('section', {}, h('h2', {}, 'Disks and NICs'), this.devices),
      h('section', {}, h('h2', {}, 'Counters'), this.counters),
      h('section', {}, h('details', {}, h('summary', {}, 'Configuration'), this.config)),
      this.detailErrors);
  }

  async action(button, action) {
    let body;
    if (action === 'stop' && !confirm(`Force ${this.name} off now? The guest gets no chance to shut down.`)) return;
    if (action === 'shutdown') body = {};
    await act(button, 'POST', `${this.base}/${action}`, body);
  }

  async setBalloon() {
    const v = this.balloonInput.value;
    if (v === '') return notify('Give the balloon target in MiB', 'error');
    await act(document.getElementById('balloon-set'), 'POST', `${this.base}/balloon`, { target_mib: Number(v) });
  }

  async migrate() {
    const body = {
      destination: this.migDest.value.trim(),
      token_file: this.migToken.value.trim(),
      downtime_ms: this.migDowntime.value ? Number(this.migDowntime.value) : undefined,
      bandwidth_mib_per_s: this.migBandwidth.value ? Number(this.migBandwidth.value) : undefined,
    };
    await act(this.migStart, 'POST', `${this.base}/migrate`, body);
  }

  toggleTyping() {
    this.consoleForm.hidden = !this.typing.checked;
    if (this.typing.checked) this.consoleInput.focus();
  }

  async sendRaw(data) {
    if (!this.typing.checked) return;
    try {
      await api('POST', `${this.base}/console`, { data });
    } catch (e) {
      notify(e.message, 'error');
    }
  }

  async type() {
    const line = this.consoleInput.value;
    this.consoleInput.value = '';
    // Enter on a terminal sends a carriage return.
    await this.sendRaw(line + '\r');
  }

  async pollConsole() {
    if (this.left) return;
    try {
      const c = await api('GET', `${this.base}/console?since=${this.consoleNext}`);
      if (c.dropped && this.consoleNext) this.consoleText += `\n[… ${c.dropped} bytes not kept …]\n`;
      if (c.text) {
        const atBottom = this.consoleOut.scrollTop + this.consoleOut.clientHeight >= this.consoleOut.scrollHeight - 4;
        this.consoleText = (this.consoleText + stripTerminal(c.text)).slice(-200000);
        this.consoleOut.textContent = this.consoleText;
        if (atBottom) this.consoleOut.scrollTop = this.consoleOut.scrollHeight;
      }
      this.consoleNext = c.next;
      this.consoleStatus.textContent = c.note ? c.note
        : `from ${c.source}; ${c.connected ? 'live' : 'not connected'}${c.writable ? '' : ', read-only'}`;
      this.typing.disabled = !c.writable;
    } catch (e) {
      this.consoleStatus.textContent = e.message;
    }
    this.consoleTimer = setTimeout(() => this.pollConsole(), 500);
  }

  async refreshDetail() {
    try {
      const d = await api('GET', this.base);
      if (this.left) return;
      this.config.textContent = d.info ? JSON.stringify(d.info.config, null, 2) : '(no VM defined)';
      const rows = [];
      for (const [dev, vals] of Object.entries(d.counters || {})) {
        for (const [k, v] of Object.entries(vals)) rows.push(h('tr', {}, h('td', {}, dev), h('td', {}, k), h('td', { class: 'num' }, v)));
      }
      this.counters.replaceChildren(rows.length
        ? h('table', { class: 'counters' }, h('thead', {}, h('tr', {}, h('th', {}, 'component'), h('th', {}, 'counter'), h('th', {}, 'value'))), h('tbody', {}, rows))
        : h('p', { class: 'muted' }, 'none'));
      this.detailErrors.replaceChildren(...d.errors.map((e) => h('p', { class: 'error-text' }, e)));
      if (d.balloon) this.balloonStats = d.balloon;
    } catch (e) {
      this.detailErrors.replaceChildren(h('p', { class: 'error-text' }, e.message));
    }
  }

  update(snap) {
    const g = snap.guests.find((x) => x.name === this.name);
    const gone = (snap.departed || []).find((x) => x.name === this.name);
    if (!g) {
      this.head.replaceChildren(h('h1', {}, this.name, ' ', stateBadge('gone')),
        h('p', { class: 'muted' }, `${this.name}.sock is no longer in ${snap.socket_dir}.`));
      for (const b of Object.values(this.buttons)) b.disabled = true;
      if (gone) this.showMigration(gone.migration);
      return;
    }
    this.head.replaceChildren(
      h('h1', {}, this.name, ' ', stateBadge(g.state)),
      h('p', { class: 'muted' }, `pid ${g.pid ?? '–'} · ${g.vcpus ?? '–'} vCPUs · up ${duration(g.uptime_s)} · ${g.socket}`),
      g.error ? h('p', { class: 'error-text' }, g.error) : '');
    const b = this.buttons;
    const live = ['running', 'paused'].includes(g.state);
    b.pause.hidden = g.state !== 'running';
    b.resume.hidden = g.state !== 'paused';
    for (const k of ['shutdown', 'stop', 'reboot']) b[k].disabled = !live;
    const hs = g.history;
    this.charts.replaceChildren(
      h('figure', {}, h('figcaption', {}, 'CPU (% of one core)'), chart(hs, [SERIES.cpu], { w: 300, h: 90, format: pct, max: 5, label: 'CPU' })),
      h('figure', {}, h('figcaption', {}, 'Memory (RSS, PSS)'), chart(hs, [SERIES.rss, SERIES.pss], { w: 300, h: 90, format: mib, label: 'memory' })),
      h('figure', {}, h('figcaption', {}, 'Disk I/O (read + write)'), chart(hs, [SERIES.disk], { w: 300, h: 90, format: rate, label: 'disk' })),
      h('figure', {}, h('figcaption', {}, 'NIC I/O (rx + tx)'), chart(hs, [SERIES.net], { w: 300, h: 90, format: rate, label: 'network' })));
    const m = g.memory;
    this.memory.replaceChildren(h('table', { class: 'kv' }, h('tbody', {},
      [['configured', bytes(m.configured_bytes)],
        ['RSS (host memory of the VMM)', bytes(m.rss_bytes)],
        ['PSS (shared pages split)', bytes(m.pss_bytes)],
        ['KSM-shared', m.ksm_merging_pages === null ? '–' : bytes(m.ksm_merging_pages * 4096)],
        ['balloon target', g.balloon ? bytes(m.balloon_target_bytes) : 'no balloon device'],
        ['balloon holds', g.balloon ? bytes(m.balloon_actual_bytes) : '–'],
      ].map(([k, v]) => h('tr', {}, h('th', {}, k), h('td', {}, v))))));
    this.balloonForm.hidden = !g.balloon;
    this.devices.replaceChildren(
      g.disks.length ? h('table', {}, h('thead', {}, h('tr', {}, ['disk', 'path', 'read', 'write', 'read total', 'written total', 'errors'].map((t) => h('th', {}, t)))),
        h('tbody', {}, g.disks.map((d) => h('tr', {}, h('td', {}, d.id), h('td', {}, d.path + (d.readonly ? ' (read-only)' : '')),
          h('td', {}, rate(d.read_bps)), h('td', {}, rate(d.write_bps)), h('td', {}, bytes(d.read_bytes)), h('td', {}, bytes(d.write_bytes)), h('td', {}, d.errors)))))
        : h('p', { class: 'muted' }, 'no disks'),
      g.nets.length ? h('table', {}, h('thead', {}, h('tr', {}, ['NIC', 'tap', 'MAC', 'rx', 'tx', 'rx total', 'tx total'].map((t) => h('th', {}, t)))),
        h('tbody', {}, g.nets.map((n) => h('tr', {}, h('td', {}, n.id), h('td', {}, n.tap || '–'), h('td', {}, n.mac || '–'),
          h('td', {}, rate(n.rx_bps)), h('td', {}, rate(n.tx_bps)), h('td', {}, bytes(n.rx_bytes)), h('td', {}, bytes(n.tx_bytes))))))
        : h('p', { class: 'muted' }, 'no NICs'));
    this.showMigration(g.migration);
  }

  showMigration(m) {
    const running = m && ['setup', 'active', 'switch-over'].includes(m.phase);
    this.migCancel.hidden = !running;
    this.migStart.disabled = !!running;
    if (!m || m.phase === 'none') {
      this.migProgress.hidden = true;
      this.migPhase.textContent = 'no migration has run';
      this.migFigures.replaceChildren();
      return;
    }
    this.migProgress.hidden = m.progress_percent === null;
    if (m.progress_percent !== null) this.migProgress.value = m.progress_percent;
    this.migPhase.textContent = `${m.role === 'receive' ? 'incoming' : 'outgoing'} migration: ${m.phase}`
      + (m.destination ? ` to ${m.destination}` : '')
      + (m.progress_percent !== null ? ` (${m.progress_percent.toFixed(0)}%)` : '');
    this.migPhase.className = 'phase phase-' + m.phase;
    this.migFigures.replaceChildren(
      h('span', {}, 'sent ', h('b', { id: 'mig-sent' }, bytes(m.transferred_bytes)), ' of ', bytes(m.total_bytes), ' RAM'),
      h('span', {}, 'remaining ', bytes(m.remaining_bytes)),
      h('span', {}, 'rounds ', m.iterations),
      h('span', {}, 'throughput ', rate(m.throughput_bytes_per_s)),
      h('span', {}, m.phase === 'completed' ? 'downtime ' : 'expected downtime ',
        h('b', { id: 'mig-downtime-value' }, ms(m.phase === 'completed' ? m.downtime_ms : m.expected_downtime_ms))),
      h('span', {}, 'time ', ms(m.total_time_ms)),
      m.throttle_percent ? h('span', {}, 'throttle ', m.throttle_percent, '%') : '',
      m.error ? h('div', { class: 'error-text', id: 'mig-error' }, m.error) : '');
  }
}

// ---------- the cluster ----------

class ClusterView {
  constructor(main) {
    this.body = h('div', {}, h('p', { class: 'muted' }, 'Asking crm_mon…'));
    main.replaceChildren(h('h1', {}, 'Cluster'), this.body);
    this.refresh();
    this.timer = setInterval(() => this.refresh(), 5000);
  }

  leave() { this.left = true; clearInterval(this.timer); }

  update() {}

  async refresh() {
    let c;
    try {
      c = await api('GET', '/api/cluster');
    } catch (e) {
      this.body.replaceChildren(h('p', { class: 'error-box' }, e.message));
      return;
    }
    if (this.left) return;
    if (!c.available) {
      this.body.replaceChildren(h('p', { class: 'error-box', id: 'cluster-unavailable' },
        'No Pacemaker cluster answers on this host: ', c.reason || 'unknown reason'));
      return;
    }
    const online = c.nodes.filter((n) => n.state === 'online').map((n) => n.name);
    const local = new Set(((S.snapshot && S.snapshot.guests) || []).map((g) => g.name));
    const resources = c.resources.map((r) => {
      let move = '';
      if (r.movable) {
        const choices = online.filter((n) => !r.nodes.includes(n));
        const select = h('select', { 'data-resource': r.id, class: 'move-node' },
          choices.map((n) => h('option', { value: n }, n)));
        move = h('span', { class: 'move' }, select,
          h('button', {
            type: 'button', class: 'small', 'data-move': r.id, disabled: !choices.length,
            onclick: (e) => this.move(e.target, r.id, select.value),
          }, 'Move to node'),
          h('button', {
            type: 'button', class: 'small', 'data-clear': r.id,
            title: 'remove the location constraints earlier moves left (crm_resource --clear)',
            onclick: (e) => act(e.target, 'POST', '/api/cluster/clear', { resource: r.id }).then(() => this.refresh()),
          }, 'Clear moves'));
      }
      const name = r.guest && local.has(r.id) ? h('a', { href: '#/guest/' + encodeURIComponent(r.id) }, r.id) : r.id;
      return h('tr', { 'data-resource-row': r.id, class: r.parent ? 'child' : '' },
        h('td', {}, r.parent ? '↳ ' : '', name, r.guest ? h('span', { class: 'tag' }, 'guest') : ''),
        h('td', {}, r.agent), h('td', {}, r.role),
        h('td', { class: 'nodes' }, r.nodes.join(', ') || '–'),
        h('td', {}, r.failed ? h('span', { class: 'error-text' }, 'failed') : r.managed ? 'managed' : 'unmanaged'),
        h('td', {}, move));
    });
    this.body.replaceChildren(
      h('p', { class: 'muted' }, `stack ${c.stack || '–'} · DC ${c.dc || 'none'} · `,
        c.quorum === null ? 'quorum unknown' : c.quorum ? 'has quorum' : h('span', { class: 'error-text' }, 'NO QUORUM')),
      h('h2', {}, 'Nodes'),
      h('table', { id: 'cluster-nodes' }, h('thead', {}, h('tr', {}, ['node', 'state', 'resources'].map((t) => h('th', {}, t)))),
        h('tbody', {}, c.nodes.map((n) => h('tr', { 'data-node': n.name },
          h('td', {}, n.name, n.is_dc ? h('span', { class: 'tag' }, 'DC') : ''),
          h('td', {}, h('span', { class: 'state state-' + n.state.replace(' ', '-') }, n.state)),
          h('td', {}, n.resources_running))))),
      h('h2', {}, 'Resources'),
      h('p', { class: 'muted' }, '"Move to node" runs crm_resource --move: the cluster migrates the guest (live, if allow-migrate is set) and keeps it there until the move is cleared.'),
      h('table', { id: 'cluster-resources' }, h('thead', {}, h('tr', {}, ['resource', 'agent', 'role', 'runs on', 'status', ''].map((t) => h('th', {}, t)))),
        h('tbody', {}, resources)),
      c.failures.length ? h('h2', {}, 'Failures') : '',
      c.failures.length ? h('ul', { class: 'failures' }, c.failures.map((f) => h('li', { class: 'error-text' },
        `${f.resource} ${f.operation} on ${f.node}: ${f.status}${f.reason ? ' (' + f.reason + ')' : ''}`))) : '');
  }

  async move(button, resource, node) {
    if (!node) return;
    await act(button, 'POST', '/api/cluster/move', { resource, node });
    this.refresh();
  }
}

// ---------- routing and live updates ----------

function parseRoute() {
  const hash = location.hash || '#/';
  const guest = hash.match(/^#\/guest\/(.+)$/);
  if (guest) return { view: 'guest', name: decodeURIComponent(guest[1]) };
  if (hash === '#/cluster') return { view: 'cluster' };
  return { view: 'list' };
}

function render() {
  const route = parseRoute();
  if (S.view && S.view.leave) S.view.leave();
  const main = document.getElementById('main');
  window.scrollTo(0, 0);
  if (route.view === 'guest') S.view = new GuestView(main, route.name);
  else if (route.view === 'cluster') S.view = new ClusterView(main);
  else S.view = new ListView(main);
  S.route = route;
  document.getElementById('nav-guests').classList.toggle('active', route.view !== 'cluster');
  document.getElementById('nav-cluster').classList.toggle('active', route.view === 'cluster');
  if (S.snapshot) S.view.update(S.snapshot);
}

function connect() {
  const conn = document.getElementById('conn');
  const source = new EventSource('/api/events');
  source.addEventListener('snapshot', (e) => {
    S.snapshot = JSON.parse(e.data);
    conn.textContent = 'live';
    conn.className = 'conn conn-live';
    const n = S.snapshot.guests.length;
    document.getElementById('host-info').textContent = `${n} guest${n === 1 ? '' : 's'} · ${S.snapshot.socket_dir}`;
    if (S.view) S.view.update(S.snapshot);
  });
  source.onerror = () => {
    conn.textContent = 'connection to vmm-web lost; retrying…';
    conn.className = 'conn conn-lost';
  };
}

async function start() {
  try {
    S.session = await api('GET', '/api/session');
  } catch (e) {
    notify('Cannot start: ' + e.message, 'error');
    return;
  }
  const logout = document.getElementById('logout');
  logout.hidden = !S.session.auth_required;
  logout.addEventListener('click', async () => {
    await fetch('/logout', { method: 'POST', headers: { 'X-CSRF-Token': S.session.csrf_token || '' } });
    location.href = '/login';
  });
  window.addEventListener('hashchange', render);
  render();
  connect();
}

start();
