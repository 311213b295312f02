// Routy console: reads the relay's /status and /v1/history with the operator's token and
// renders them; actions are POSTs after a confirmation. No framework: small DOM helpers,
// and a morph step so that a refresh updates text in place (a button under the pointer
// survives a refresh, so a click is never lost).
'use strict';
(() => {
  const TOKEN_KEY = 'routy-admin-token';
  const STATUS_EVERY_MS = 2000;
  const HISTORY_EVERY_MS = 5000;
  const TIMEOUT_MS = 6000;
  const DASH = '–';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const COLORS = ['#2563eb', '#d9480f', '#2b8a3e', '#9c36b5', '#c2255c', '#0b7285', '#e8a400', '#5c5f66'];

  const $ = (sel) => document.querySelector(sel);

  const state = {
    status: null,
    role: null,
    history: null,
    historyNote: 'Loading…',
    lastOk: null,
    signingIn: false,
    pending: null,
    expanded: new Set(),
  };

  // ---- token -------------------------------------------------------------------------
  const token = {
    get() {
      try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (_) { return ''; }
    },
    set(v) {
      try { sessionStorage.setItem(TOKEN_KEY, v); } catch (_) { /* storage refused */ }
    },
    clear() {
      try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* storage refused */ }
    },
  };

  // ---- formatting --------------------------------------------------------------------
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const nf = new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 });
  const text = (v) => (v === null || v === undefined || v === '' ? DASH : String(v));
  const count = (v) => (isNum(v) ? nf.format(v) : DASH);
  const plural = (n, one) => `${nf.format(n)} ${one}${n === 1 ? '' : 's'}`;

  function bytes(v) {
    if (!isNum(v)) return DASH;
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let x = Math.abs(v);
    let i = 0;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
    const digits = i === 0 ? 0 : x < 10 ? 2 : x < 100 ? 1 : 0;
    return (v < 0 ? '-' : '') + x.toFixed(digits) + ' ' + units[i];
  }
  const rate = (v) => (isNum(v) ? bytes(v) + '/s' : DASH);

  function duration(v) {
    if (!isNum(v)) return DASH;
    if (v <= 0) return '0 s';
    if (v < 1) return Math.round(v * 1000) + ' ms';
    if (v < 60) return (v < 10 ? v.toFixed(1) : Math.floor(v)) + ' s';
    const s = Math.floor(v);
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function rtt(v) {
    if (!isNum(v)) return DASH;
    const ms = v * 1000;
    if (ms < 1) return ms.toFixed(2) + ' ms';
    if (ms < 100) return ms.toFixed(1) + ' ms';
    if (ms < 1000) return Math.round(ms) + ' ms';
    return v.toFixed(2) + ' s';
  }

  /** A value in a chart's unit, short. */
  function inUnit(v, unit) {
    if (!isNum(v)) return DASH;
    switch (unit) {
      case 'bytes/s': return rate(v);
      case 'bytes': return bytes(v);
      case 'seconds': return duration(v);
      default: return compact(v);
    }
  }

  function compact(v) {
    if (!isNum(v)) return DASH;
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + 'G';
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + 'M';
    if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + 'k';
    return Number.isInteger(v) ? String(v) : v.toFixed(a < 10 ? 2 : 1);
  }

  const clock = (d) => d.toLocaleTimeString('en-GB', { hour12: false });

  /** RFC 3339 UTC, seconds precision unless there are milliseconds. */
  function rfc3339(d) {
    return d.toISOString().replace('.000Z', 'Z');
  }

  // ---- DOM ---------------------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, kids);
    return el;
  }

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, kids);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function append(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.append(k instanceof Node ? k : String(k));
    }
  }

  const sameNode = (a, b) =>
    a.nodeType === b.nodeType &&
    a.nodeName === b.nodeName &&
    (a.nodeType !== 1 || a.getAttribute('data-key') === b.getAttribute('data-key'));

  /** Makes `live` look like `next`, reusing the nodes that match. */
  function morph(live, next) {
    if (live.nodeType === 1) {
      for (const a of Array.from(live.attributes)) {
        if (!next.hasAttribute(a.name)) live.removeAttribute(a.name);
      }
      for (const a of Array.from(next.attributes)) {
        if (live.getAttribute(a.name) !== a.value) live.setAttribute(a.name, a.value);
      }
    }
    const want = Array.from(next.childNodes);
    want.forEach((n, i) => {
      const l = live.childNodes[i];
      if (!l) live.appendChild(n);
      else if (!sameNode(l, n)) live.replaceChild(n, l);
      else if (l.nodeType === 3 || l.nodeType === 8) {
        if (l.nodeValue !== n.nodeValue) l.nodeValue = n.nodeValue;
      } else morph(l, n);
    });
    while (live.childNodes.length > want.length) live.lastChild.remove();
  }

  function update(container, ...kids) {
    const next = container.cloneNode(false);
    append(next, kids);
    morph(container, next);
  }

  const td = (cls, ...kids) => h('td', cls ? { class: cls } : null, ...kids);

  /** A badge for a flag: `yes` (up) when true, `no` (down) when false, a dash otherwise. */
  const flag = (v, yes, no) => (v === true ? badge(yes, 'up') : v === false ? badge(no, 'down') : DASH);

  function badge(label, kind, extra) {
    return h('span', { class: `badge ${kind}`, ...extra }, label);
  }

  function button(label, action, data, opts) {
    const o = opts || {};
    return h('button', {
      type: 'button',
      class: 'btn small' + (o.kind ? ' ' + o.kind : ''),
      'data-action': action,
      'data-key': action,
      disabled: o.disabled,
      title: o.title,
      ...data,
    }, label);
  }

  /** A table; `cols` are [label, class] pairs, `rows` built by the caller. */
  function table(cols, rows, empty) {
    const head = h('thead', null, h('tr', null, cols.map(([label, cls]) => h('th', { class: cls }, label))));
    const body = h('tbody', null, rows.length ? rows
      : h('tr', { class: 'empty' }, h('td', { colspan: cols.length }, empty)));
    return h('div', { class: 'table-wrap' }, h('table', null, head, body));
  }

  function card(key, title, extra, ...body) {
    return h('section', { class: 'card', 'data-key': key, id: key },
      h('div', { class: 'card-head' }, h('h2', null, title), extra), body);
  }

  function tile(label, value, kind) {
    return h('div', { class: 'tile' + (kind ? ' ' + kind : '') },
      h('div', { class: 'tile-label' }, label), h('div', { class: 'tile-value' }, value));
  }

  /** A long error, two lines until clicked; `old`: kept from before a recovery (grey). */
  function errorText(key, msg, cls, old) {
    if (msg === null || msg === undefined || msg === '') return h('td', { class: cls }, DASH);
    const open = state.expanded.has(key);
    return h('td', { class: `${cls} err` },
      h('span', { class: 'err-text' + (open ? ' open' : '') + (old ? ' old' : ''), 'data-expand': key, title: open ? null : String(msg) }, String(msg)));
  }

  /** Entries of a map or a list of objects with a name. */
  function entries(v) {
    if (Array.isArray(v)) return v.map((x, i) => [x && typeof x === 'object' && x.name ? String(x.name) : String(i), x || {}]);
    if (v && typeof v === 'object') return Object.entries(v).map(([k, x]) => [k, x && typeof x === 'object' ? x : {}]);
    return [];
  }

  const arr = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v && typeof v === 'object' && !Array.isArray(v) ? v : {});

  // ---- relay-outer -------------------------------------------------------------------
  function outerIdentity(st) {
    return [
      badge('relay-outer', 'role'),
      meta('version', text(st.version)),
      meta('uptime', duration(st.uptime_seconds)),
      meta('tunnel', text(st.tunnel_listen)),
      meta('threads', count(st.threads)),
    ];
  }

  function outerSinks(st) {
    const out = [];
    for (const [source, src] of entries(obj(st.cdc).sources)) {
      for (const [name, k] of entries(src.sinks)) out.push([name, k, source]);
    }
    return out;
  }

  function outerTiles(st) {
    const sessions = arr(st.sessions);
    const listeners = arr(st.listeners);
    const up = listeners.filter((l) => l && l.tunnel_up === true).length;
    const clients = listeners.reduce((n, l) => n + (isNum(l && l.connections) ? l.connections : 0), 0);
    const thru = listeners.reduce((n, l) => n + (isNum(l && l.bytes_per_second) ? l.bytes_per_second : 0), 0);
    const sinks = outerSinks(st);
    const running = sinks.filter(([, k]) => k.state === 'running').length;
    const lags = sinks.map(([, k]) => k.lag_seconds).filter(isNum);
    const maxLag = lags.length ? Math.max(...lags) : null;
    return h('div', { class: 'tiles', 'data-key': 'tiles' },
      tile('Tunnel sessions', count(sessions.length), sessions.length ? '' : 'bad'),
      tile('Listeners up', `${up} / ${listeners.length}`, up < listeners.length ? 'bad' : ''),
      tile('Clients', count(clients)),
      tile('Open streams', count(st.open_streams)),
      tile('Throughput', listeners.length ? rate(thru) : DASH),
      st.cdc ? tile('Sinks running', `${running} / ${sinks.length}`, running < sinks.length ? 'warn' : '') : null,
      st.cdc ? tile('Max CDC lag', duration(maxLag), isNum(maxLag) && maxLag > 60 ? 'warn' : '') : null);
  }

  function sessionsCard(st) {
    const rows = arr(st.sessions).map((x) => {
      const v = obj(x);
      const id = text(v.id);
      const bps = isNum(v.bytes_per_second) ? v.bytes_per_second : v.tunnel_bytes_per_second;
      const services = arr(v.services).join(', ');
      return h('tr', { 'data-session': id, 'data-key': 's' + id },
        td('num mono', id),
        td('strong', text(v.tunnel)),
        td(null, text(v.node), h('div', { class: 'muted small mono' }, text(v.peer))),
        td(null, text(v.transport), h('div', { class: 'muted small' }, `thread ${v.thread === null || v.thread === undefined ? DASH : v.thread}`)),
        td('num rtt', rtt(v.rtt_seconds)),
        td('num streams', count(v.open_streams)),
        h('td', { class: 'num bps', title: isNum(v.bytes_per_second) ? null : 'the tunnel\'s, all its sessions' }, rate(bps)),
        td('num', duration(v.uptime_seconds)),
        h('td', { class: 'services clip', title: services || null }, services || DASH),
        td('draining', v.draining === true ? badge('draining', 'warn') : v.draining === false ? badge('active', 'up') : DASH),
        td('actions', button('Drain', 'drain',
          { 'data-session': id, 'data-tunnel': text(v.tunnel), 'data-node': text(v.node) },
          { disabled: v.draining === true || v.id === null || v.id === undefined, title: 'Move this session\'s tunnel to a new session without cutting clients' })));
    });
    return card('tunnels', 'Tunnels', h('span', { class: 'muted small' }, plural(arr(st.sessions).length, 'session')),
      table([['ID', 'num'], ['Tunnel'], ['Node / peer'], ['Transport'], ['RTT', 'num'],
        ['Streams', 'num'], ['Bytes/s', 'num'], ['Age', 'num'], ['Services'], ['State'], ['', 'actions']],
      rows, 'No tunnel session: no relay-inner is connected.'));
  }

  function refusedCell(refused) {
    const nonzero = Object.entries(obj(refused)).filter(([, n]) => isNum(n) && n > 0).sort((a, b) => b[1] - a[1]);
    if (!nonzero.length) return td('refused', refused && typeof refused === 'object' ? '0' : DASH);
    return td('refused', nonzero.map(([reason, n]) =>
      h('span', { class: 'chip', 'data-reason': reason }, `${reason.replace(/_/g, ' ')} `, h('b', null, count(n)))));
  }

  function listenersCard(st) {
    const rows = arr(st.listeners).map((x) => {
      const v = obj(x);
      const name = text(v.name);
      const up = v.tunnel_up === true ? 'up' : v.tunnel_up === false ? 'down' : null;
      const max = isNum(v.max_connections) ? v.max_connections : null;
      const used = isNum(v.connections) ? v.connections : null;
      const pct = max && used !== null ? Math.min(100, (used / max) * 100) : 0;
      return h('tr', { 'data-listener': name, 'data-key': 'l' + name },
        td('strong', name),
        td('mono', text(v.bind)),
        td(null, text(v.tunnel)),
        td(null, text(v.service)),
        td('tunnel-state', up ? badge(up, up) : DASH),
        h('td', { class: 'clients num', 'data-value': used === null ? null : used },
          `${used === null ? DASH : used} / ${max === null ? DASH : max}`,
          max !== null && s('svg', { class: 'meter' + (pct >= 90 ? ' hot' : ''), viewBox: '0 0 100 4', preserveAspectRatio: 'none', 'aria-hidden': 'true' },
            s('rect', { class: 'track', width: 100, height: 4 }), s('rect', { class: 'fill', width: pct.toFixed(1), height: 4 }))),
        td('num bps', rate(v.bytes_per_second)),
        refusedCell(v.refused));
    });
    return card('listeners', 'Listeners', h('span', { class: 'muted small' }, plural(arr(st.listeners).length, 'listener')),
      table([['Name'], ['Bind'], ['Tunnel'], ['Service'], ['Tunnel state'], ['Clients / max', 'num'], ['Bytes/s', 'num'], ['Refused (so far)']],
        rows, 'No listener configured.'));
  }

  const SINK_STATE = { running: 'up', starting: 'info', retrying: 'warn', paused: 'muted', stopped: 'down', failed: 'down' };

  function cdcOuterCard(st) {
    const cdc = obj(st.cdc);
    const sources = entries(cdc.sources).map(([name, v]) => {
      const problem = v.error || v.damage;
      return h('tr', { 'data-source': name, 'data-key': 'src' + name },
        td('strong', name),
        td('shipping', flag(v.connected, 'connected', 'not connected')),
        td('num mono', count(v.first_seq)),
        td('num mono', count(v.last_seq)),
        td('num', bytes(v.bytes)),
        td('mono muted', text(v.spool_id)),
        errorText('srcerr' + name, problem ? [v.error, v.damage].filter(Boolean).map((e) => (typeof e === 'string' ? e : JSON.stringify(e))).join(' · ') : null, 'last-error'));
    });
    const sinks = outerSinks(st).map(([name, k, source]) => {
      const stt = typeof k.state === 'string' ? k.state : null;
      const paused = k.paused === true;
      const canResume = paused || stt === 'stopped' || stt === 'paused';
      const pending = k.replay_pending ? badge(`replay → ${k.replay_pending}`, 'info') : null;
      const blocked = k.blocked_by ? badge('blocked by damage', 'down', { title: typeof k.blocked_by === 'string' ? k.blocked_by : JSON.stringify(k.blocked_by) }) : null;
      const lagS = k.lag_seconds;
      return h('tr', { 'data-sink': name, 'data-key': 'k' + name },
        td('strong', name),
        td(null, text(k.source || source)),
        td('kind', text(k.kind), k.durability ? h('span', { class: 'muted small' }, ' · ' + k.durability) : null),
        td('position mono', text(k.position), pending ? ' ' : null, pending),
        h('td', { class: 'num lag-records' + (isNum(k.lag_records) && k.lag_records > 0 ? ' hl' : '') }, count(k.lag_records)),
        h('td', { class: 'num lag-seconds' + (isNum(lagS) && lagS > 60 ? ' hl' : '') }, isNum(lagS) ? duration(lagS) : DASH),
        td('state', stt ? badge(stt, SINK_STATE[stt] || 'muted') : DASH),
        errorText('sinkerr' + name, k.last_error, 'last-error', stt === 'running'),
        h('td', { class: 'actions' },
          blocked,
          canResume
            ? button('Resume', 'resume', { 'data-sink': name }, { kind: 'primary', title: 'Deliver again (a stopped sink tries the refused batch again)' })
            : button('Pause', 'pause', { 'data-sink': name }, { title: 'Stop delivering until resumed' }),
          button('Replay…', 'replay', { 'data-sink': name }, { title: 'Deliver again from a time or a position' })));
    });
    const note = h('span', { class: 'muted small' },
      `retention ${duration(cdc.retention_seconds)}`, cdc.dir ? ` · ${cdc.dir}` : '');
    return card('cdc', 'Change data capture', note,
      h('h3', null, 'Sources (stores)'),
      table([['Source'], ['Shipping'], ['First seq', 'num'], ['Last seq', 'num'], ['Store size', 'num'], ['Spool ID'], ['Error']],
        sources, 'No source has shipped to this relay yet.'),
      h('h3', null, 'Sinks'),
      table([['Sink'], ['Source'], ['Kind'], ['Position'], ['Lag (records)', 'num'], ['Lag (time)', 'num'], ['State'], ['Last error'], ['', 'actions']],
        sinks, 'No sink configured.'));
  }

  function renderOuter(st) {
    return [outerTiles(st), sessionsCard(st), listenersCard(st), st.cdc ? cdcOuterCard(st) : null];
  }

  // ---- relay-inner -------------------------------------------------------------------
  function innerIdentity(st) {
    return [
      badge('relay-inner', 'role'),
      meta('node', text(st.node)),
      meta('version', text(st.version)),
      meta('uptime', duration(st.uptime_seconds)),
      meta('threads', count(st.threads)),
    ];
  }

  function innerTiles(st) {
    const outer = arr(st.outer);
    const up = outer.filter((e) => e && e.up === true).length;
    const sources = arr(obj(st.cdc).sources);
    const streaming = sources.filter((x) => obj(obj(x).source).phase === 'streaming').length;
    const wal = sources.map((x) => obj(obj(x).source).retained_wal_bytes).filter(isNum);
    const spool = sources.map((x) => obj(obj(x).spool).bytes).filter(isNum);
    const sum = (a) => a.reduce((n, x) => n + x, 0);
    return h('div', { class: 'tiles', 'data-key': 'tiles' },
      tile('Relay-outer sessions', `${up} / ${outer.length}`, up < outer.length ? 'bad' : ''),
      tile('Services', count(arr(st.services).length)),
      tile('Open streams', count(st.open_streams)),
      st.cdc ? tile('Sources streaming', `${streaming} / ${sources.length}`, streaming < sources.length ? 'warn' : '') : null,
      st.cdc ? tile('Retained WAL', wal.length ? bytes(sum(wal)) : DASH) : null,
      st.cdc ? tile('Spool', spool.length ? bytes(sum(spool)) : DASH) : null);
  }

  function endpointsCard(st) {
    const rows = arr(st.outer).map((x, i) => {
      const e = obj(x);
      const sess = e.session && typeof e.session === 'object' ? e.session : null;
      const err = e.last_error && typeof e.last_error === 'object' ? e.last_error : null;
      const many = isNum(e.connections) && e.connections > 1;
      const addr = text(e.addr);
      const proxy = e.proxy && typeof e.proxy === 'object' ? `${text(e.proxy.url)} (${text(e.proxy.from)})` : 'direct';
      const up = e.up === true ? 'up' : e.up === false ? 'down' : null;
      return h('tr', { 'data-endpoint': addr, 'data-connection': isNum(e.connection) ? e.connection : null, 'data-key': `e${i}${addr}` },
        td('strong mono', addr, many ? h('span', { class: 'muted' }, ` #${e.connection + 1}/${e.connections}`) : null),
        td('tunnel-state', up ? badge(up, up) : DASH),
        td(null, sess ? text(sess.transport) : DASH),
        td(null, sess ? text(sess.tunnel) : DASH),
        td('num mono', sess ? text(sess.id) : DASH),
        td('num rtt', sess ? rtt(sess.rtt_seconds) : DASH),
        td('num', sess ? duration(sess.uptime_seconds) : DASH),
        td('num', count(e.connects)),
        td('wrap', proxy),
        errorText(`eperr${i}`, err ? `${text(err.reason)} (${duration(err.seconds_ago)} ago)` : null, 'last-error', e.up === true));
    });
    return card('endpoints', 'Relay-outer endpoints', h('span', { class: 'muted small' }, plural(arr(st.outer).length, 'endpoint')),
      table([['Address'], ['Session'], ['Transport'], ['Tunnel'], ['Session ID', 'num'], ['RTT', 'num'], ['Age', 'num'], ['Connects', 'num'], ['Proxy'], ['Last error']],
        rows, 'No relay-outer endpoint configured.'));
  }

  function servicesCard(st) {
    const latest = latestByName('service_throughput');
    const rows = arr(st.services).map((name) => {
      const n = text(name);
      return h('tr', { 'data-service': n, 'data-key': 'svc' + n },
        td('strong', n),
        td('num bps', rate(latest.get(n))));
    });
    return card('services', 'Services', h('span', { class: 'muted small' }, 'throughput from the last history sample'),
      table([['Service'], ['Bytes/s', 'num']], rows, 'No service configured.'));
  }

  const PHASE = { streaming: 'up', snapshot: 'info', connecting: 'warn', failed: 'down' };

  function cdcInnerCard(st) {
    const cdc = obj(st.cdc);
    const rows = [];
    for (const x of arr(cdc.sources)) {
      const v = obj(x);
      const name = text(v.name);
      const src = obj(v.source);
      const spool = obj(v.spool);
      const ships = arr(v.shipping).map((y) => {
        const sh = obj(y);
        return h('div', { class: 'ship' },
          flag(sh.connected, 'up', 'down'), ' ',
          h('span', { class: 'mono', title: sh.last_error ? `last error: ${sh.last_error}` : null }, text(sh.outer)), ' ',
          h('span', { class: 'muted small nw' }, `acked ${count(sh.acked_seq)} / sent ${count(sh.sent_seq)}`));
      });
      const wal = isNum(src.retained_wal_bytes) ? bytes(src.retained_wal_bytes) : DASH;
      rows.push(h('tr', { 'data-source': name, 'data-key': 'src' + name, class: 'group' },
        td(null, h('span', { class: 'strong' }, name),
          h('div', { class: 'muted small' }, `slot ${text(v.slot || src.slot)} · publication ${text(v.publication)}`)),
        td('phase', src.phase ? badge(String(src.phase), PHASE[src.phase] || 'muted') : DASH,
          h('div', { class: 'muted small mono' }, `LSN ${text(src.confirmed_lsn)}`)),
        td('num', wal, src.wal_status ? h('div', { class: 'small ' + (src.wal_status === 'reserved' ? 'muted' : 'warn-text') }, String(src.wal_status)) : null),
        td('num', bytes(spool.bytes),
          isNum(spool.first_seq) ? h('div', { class: 'muted small' }, `seq ${count(spool.first_seq)}–${count(spool.durable_seq)}, acked ${count(spool.acked_seq)}`) : null),
        td('shipping', ships.length ? ships : DASH),
        errorText('inerr' + name, src.last_error, 'last-error', src.phase === 'streaming'),
        td('actions', button('Resync table…', 'resync', { 'data-source': name }, { title: 'Copy one table again while streaming' }))));
      // One row per table: those the source forwards (when /status lists them), the
      // initial copy's, and every resync's.
      const tables = new Map();
      const at = (t) => {
        const key = text(t);
        if (!tables.has(key)) tables.set(key, { what: null, detail: '', busy: false });
        return tables.get(key);
      };
      for (const t of arr(v.tables || src.tables)) at(t);
      const snap = src.snapshot && typeof src.snapshot === 'object' ? src.snapshot : null;
      if (snap) Object.assign(at(snap.table), { what: badge('initial copy', 'info'), detail: `${count(snap.rows)} rows copied` });
      for (const r of arr(src.resync)) {
        const p = obj(r);
        const detail = `${count(p.rows)} rows, ${count(p.chunks)} chunks` + (isNum(p.rereads) && p.rereads > 0 ? `, ${plural(p.rereads, 'chunk')} re-read` : '');
        Object.assign(at(p.table), { what: badge(`resync ${text(p.state)}`, p.state === 'copying' ? 'info' : 'muted'), detail, busy: true });
      }
      for (const [t, x] of tables) rows.push(tableRow(name, t, x));
    }
    for (const r of arr(cdc.refused)) {
      const v = obj(r);
      rows.push(h('tr', { 'data-source': text(v.name), 'data-key': 'ref' + text(v.name) },
        td('strong', text(v.name)), td('phase', badge('not started', 'down')),
        h('td', { colspan: 3 }, ''), errorText('referr' + text(v.name), v.error, 'last-error'), td(null, '')));
    }
    return card('cdc', 'Change data capture', h('span', { class: 'muted small' }, plural(arr(cdc.sources).length, 'source')),
      table([['Source / table'], ['Phase'], ['Retained WAL', 'num'], ['Spool', 'num'], ['Shipping'], ['Last error'], ['', 'actions']],
        rows, 'No CDC source configured.'));
  }

  function tableRow(source, t, x) {
    return h('tr', { class: 'sub', 'data-table': t, 'data-table-source': source, 'data-key': `t${source}/${t}` },
      td('indent mono', t),
      td('table-state', x.what || badge('forwarded', 'muted')),
      h('td', { colspan: 4, class: 'muted' }, x.detail),
      td('actions', button('Resync', 'resync', { 'data-source': source, 'data-table': t },
        { disabled: x.busy, title: x.busy ? `A resync of ${t} is under way` : `Copy ${t} again` })));
  }

  function renderInner(st) {
    return [innerTiles(st), endpointsCard(st), servicesCard(st), st.cdc ? cdcInnerCard(st) : null];
  }

  // ---- header and page ---------------------------------------------------------------
  function meta(label, value) {
    return h('span', { class: 'meta' }, h('span', { class: 'meta-label' }, label), ' ', h('span', { class: 'meta-value' }, value));
  }

  function render() {
    const st = state.status;
    const content = $('#content');
    if (!st) {
      update($('#identity'), h('span', { class: 'muted' }, state.signingIn ? 'sign in to see this relay' : 'connecting…'));
      update(content);
      $('[data-action="reload"]').hidden = true;
      return;
    }
    const role = st.role === 'relay-inner' || st.role === 'relay-outer' ? st.role
      : state.role || (Array.isArray(st.outer) ? 'relay-inner' : 'relay-outer');
    if (state.role !== role) {
      state.role = role;
      document.body.setAttribute('data-role', role);
    }
    document.title = `Routy · ${role}` + (role === 'relay-inner' && st.node ? ` · ${st.node}` : '');
    update($('#identity'), role === 'relay-inner' ? innerIdentity(st) : outerIdentity(st));
    update(content, role === 'relay-inner' ? renderInner(st) : renderOuter(st));
    $('[data-action="reload"]').hidden = false;
  }

  // ---- charts ------------------------------------------------------------------------
  const CHART = { w: 420, h: 150, l: 56, r: 8, t: 8, b: 20 };
  const plots = new Map();
  let hovered = null;

  function latestByName(id) {
    const out = new Map();
    const c = arr(obj(state.history).charts).find((x) => x && x.id === id);
    for (const ser of arr(c && c.series)) {
      const pts = arr(ser && ser.points).filter((p) => Array.isArray(p) && isNum(p[0]) && isNum(p[1]));
      if (pts.length) out.set(String(ser.name), pts[pts.length - 1][1]);
    }
    return out;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  /** A round time at or above `v` seconds (its half is round too). */
  function niceMaxSeconds(v) {
    for (const m of [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400]) {
      if (v <= m) return m;
    }
    return Math.ceil(v / 86400) * 86400;
  }

  /** An axis label: short, the unit's name left to the caption. */
  function tick(v, unit) {
    const trim = (x) => String(+x.toFixed(2));
    if (unit === 'bytes' || unit === 'bytes/s') {
      const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
      let i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
      return `${trim(v)} ${units[i]}`;
    }
    if (unit === 'seconds') {
      if (v < 60) return `${trim(v)} s`;
      if (v < 3600) return `${trim(v / 60)} min`;
      return v < 86400 ? `${trim(v / 3600)} h` : `${trim(v / 86400)} d`;
    }
    return compact(v);
  }

  function niceMaxBytes(v) {
    if (!(v > 0)) return 1024;
    const p = Math.pow(1024, Math.max(0, Math.floor(Math.log(v) / Math.log(1024))));
    return niceMax(v / p) * p;
  }

  function chartCard(c, right, windowS, step) {
    const unit = typeof c.unit === 'string' ? c.unit : '';
    const series = arr(c.series).filter((x) => x && typeof x === 'object');
    const left = right - windowS;
    let max = 0;
    for (const ser of series) {
      for (const p of arr(ser.points)) if (Array.isArray(p) && isNum(p[0]) && isNum(p[1]) && p[0] >= left) max = Math.max(max, p[1]);
    }
    const top = unit === 'bytes' || unit === 'bytes/s' ? niceMaxBytes(max)
      : unit === 'seconds' ? niceMaxSeconds(max)
      : unit === 'count' || unit === 'records' ? Math.max(4, niceMax(max)) : niceMax(max);
    const { w, h: hh, l, r, t, b } = CHART;
    const pw = w - l - r;
    const ph = hh - t - b;
    const x = (ts) => l + ((ts - left) / windowS) * pw;
    const y = (v) => t + ph - (Math.max(0, v) / top) * ph;
    const grid = [];
    for (let i = 0; i <= 4; i += 1) {
      const v = (top * i) / 4;
      const yy = y(v).toFixed(1);
      grid.push(s('line', { x1: l, x2: w - r, y1: yy, y2: yy, class: i === 0 ? 'axis' : 'grid' }));
      if (i % 2 === 0) grid.push(s('text', { x: l - 6, y: Number(yy) + 3.5, 'text-anchor': 'end', class: 'tick' }, tick(v, unit)));
    }
    for (let m = 0; m <= windowS / 60; m += 5) {
      const xx = x(left + m * 60).toFixed(1);
      const label = m * 60 === windowS ? 'now' : `−${Math.round(windowS / 60 - m)} min`;
      grid.push(s('text', { x: xx, y: hh - 5, 'text-anchor': m === 0 ? 'start' : m * 60 === windowS ? 'end' : 'middle', class: 'tick' }, label));
      if (m > 0 && m * 60 < windowS) grid.push(s('line', { x1: xx, x2: xx, y1: t, y2: t + ph, class: 'grid' }));
    }
    const lines = series.slice(0, 32).map((ser, i) => {
      const color = COLORS[i % COLORS.length];
      let d = '';
      let pen = 'M';
      for (const p of arr(ser.points)) {
        if (!Array.isArray(p) || !isNum(p[0]) || p[0] < left - 5) continue;
        if (!isNum(p[1])) { pen = 'M'; continue; }
        d += `${pen}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
        pen = 'L';
      }
      return d ? s('path', { d, stroke: color, class: 'line', 'data-key': 'p' + i }) : null;
    });
    const legend = series.slice(0, 32).map((ser, i) => {
      const pts = arr(ser.points).filter((p) => Array.isArray(p) && isNum(p[0]) && isNum(p[1]));
      const last = pts.length ? pts[pts.length - 1][1] : null;
      return h('li', { 'data-series': text(ser.name) },
        s('svg', { class: 'swatch', viewBox: '0 0 10 10', 'aria-hidden': 'true' }, s('rect', { width: 10, height: 10, rx: 2, fill: COLORS[i % COLORS.length] })), h('span', { class: 'series-name' }, text(ser.name)),
        h('span', { class: 'series-value' }, inUnit(last, unit)));
    });
    const id = text(c.id);
    plots.set(id, { series: series.slice(0, 32), unit, left, windowS, step });
    return h('figure', { class: 'chart', 'data-chart': id, 'data-key': 'c' + id },
      h('figcaption', null, h('span', { class: 'chart-title' }, text(c.title)), h('span', { class: 'muted small unit' }, unit)),
      s('svg', { class: 'plot', viewBox: `0 0 ${w} ${hh}`, role: 'img', 'aria-label': text(c.title) }, grid, lines),
      legend.length ? h('ul', { class: 'legend' }, legend) : h('p', { class: 'muted small' }, 'no series yet'));
  }

  function renderCharts() {
    plots.clear();
    hovered = null;
    const panel = $('#charts-panel');
    panel.hidden = state.signingIn;
    update($('#charts-note'), state.historyNote || '');
    const hist = state.history;
    const charts = arr(obj(hist).charts).filter((c) => c && typeof c === 'object' && Array.isArray(c.series));
    if (!charts.length) {
      update($('#charts'), h('p', { class: 'muted empty-charts' }, state.historyNote ? 'No history.' : 'No charts.'));
      return;
    }
    const windowS = isNum(hist.window_seconds) && hist.window_seconds > 0 ? hist.window_seconds : 900;
    let right = 0;
    for (const c of charts) {
      for (const ser of arr(c.series)) for (const p of arr(ser && ser.points)) if (Array.isArray(p) && isNum(p[0])) right = Math.max(right, p[0]);
    }
    if (!right) right = Date.now() / 1000;
    const step = isNum(hist.step_seconds) && hist.step_seconds > 0 ? hist.step_seconds : 5;
    update($('#charts'), h('div', { class: 'chart-grid' }, charts.map((c) => chartCard(c, right, windowS, step))));
  }

  /** Under the pointer a chart shows a line at that time, and its legend the values then. */
  function hover(ev) {
    const svg = ev.target instanceof Element ? ev.target.closest('svg.plot') : null;
    if (hovered && hovered !== svg) renderCharts();
    const fig = svg && svg.closest('figure[data-chart]');
    const p = fig && plots.get(fig.getAttribute('data-chart'));
    if (!p) return;
    const { w, h: hh, l, r, t, b } = CHART;
    const box = svg.getBoundingClientRect();
    const vx = ((ev.clientX - box.left) / box.width) * w;
    if (vx < l || vx > w - r) return;
    const ts = p.left + ((vx - l) / (w - l - r)) * p.windowS;
    hovered = svg;
    let line = svg.querySelector('line.cursor');
    if (!line) {
      line = s('line', { class: 'cursor', y1: t, y2: hh - b });
      svg.append(line);
    }
    line.setAttribute('x1', vx.toFixed(1));
    line.setAttribute('x2', vx.toFixed(1));
    const cells = fig.querySelectorAll('.series-value');
    p.series.forEach((ser, i) => {
      let best = null;
      for (const q of arr(ser.points)) {
        if (Array.isArray(q) && isNum(q[0]) && (!best || Math.abs(q[0] - ts) < Math.abs(best[0] - ts))) best = q;
      }
      if (cells[i]) cells[i].textContent = inUnit(best && Math.abs(best[0] - ts) <= p.step ? best[1] : null, p.unit);
    });
    fig.querySelector('.unit').textContent = `${p.unit} at ${clock(new Date(ts * 1000))}`;
  }

  // ---- network -----------------------------------------------------------------------
  class NetError extends Error {}

  /** One request with the stored token (or `candidate`); rejects only when no answer came. */
  async function api(method, path, candidate) {
    const headers = { Accept: 'application/json' };
    const tok = candidate === undefined ? token.get() : candidate;
    if (tok) headers.Authorization = 'Bearer ' + tok;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const res = await fetch(path, { method, headers, signal: ctl.signal, cache: 'no-store', redirect: 'error' });
      const body = await res.text();
      let json = null;
      try { json = body ? JSON.parse(body) : null; } catch (_) { json = null; }
      return { status: res.status, ok: res.ok, statusText: res.statusText, json, body };
    } catch (e) {
      throw new NetError(e && e.name === 'AbortError'
        ? `no answer within ${TIMEOUT_MS / 1000} s` : 'the relay cannot be reached');
    } finally {
      clearTimeout(timer);
    }
  }

  function answerText(r) {
    if (r.json && typeof r.json === 'object') {
      if (typeof r.json.error === 'string') return r.json.error;
      return Object.entries(r.json).map(([k, v]) =>
        `${k}: ${v !== null && typeof v === 'object' ? JSON.stringify(v) : v}`).join(', ');
    }
    return (r.body || '').trim().slice(0, 300) || r.statusText || '';
  }

  /**
   * A poller: runs `fn` now and then every `every` ms (or as many ms as `fn` returns; it
   * stops when `fn` returns false); one run at a time.
   */
  function poller(fn, every) {
    let timer = 0;
    let running = false;
    let again = false;
    let stopped = false;
    async function run() {
      stopped = false;
      if (running) { again = true; return; }
      clearTimeout(timer);
      running = true;
      let next = every;
      try { next = await fn(); } catch (e) { console.error(e); } finally { running = false; }
      if (again && !stopped) { again = false; run(); return; }
      if (next !== false && !stopped) timer = setTimeout(run, isNum(next) ? next : every);
    }
    function stop() {
      stopped = true;
      again = false;
      clearTimeout(timer);
    }
    return { run, stop };
  }

  const statusPoll = poller(async () => {
    let r;
    try {
      r = await api('GET', 'status');
    } catch (e) {
      failed(e.message);
      return true;
    }
    if (r.status === 401) { needToken(r); return false; }
    if (!r.ok || !r.json || typeof r.json !== 'object') {
      failed(`/status answered ${r.status} ${answerText(r)}`.trim());
      return true;
    }
    state.status = r.json;
    state.lastOk = new Date();
    const up = $('#updated');
    up.textContent = clock(state.lastOk);
    up.setAttribute('datetime', state.lastOk.toISOString());
    $('#error-banner').hidden = true;
    document.body.classList.remove('stale');
    render();
    return true;
  }, STATUS_EVERY_MS);

  const historyPoll = poller(async () => {
    let r;
    try {
      r = await api('GET', 'v1/history');
    } catch (e) {
      state.historyNote = `history: ${e.message}`;
      renderCharts();
      return true;
    }
    if (r.status === 401) { needToken(r); return false; }
    if (r.status === 404) {
      state.history = null;
      state.historyNote = 'no history on this relay';
      renderCharts();
      return 60000; // a relay without /v1/history: asked again now and then, quietly
    } else if (!r.ok || !r.json || typeof r.json !== 'object') {
      state.historyNote = `history: ${r.status} ${answerText(r)}`.trim();
    } else {
      state.history = r.json;
      state.historyNote = '';
    }
    renderCharts();
    if (state.role === 'relay-inner' && state.status) render();
    return true;
  }, HISTORY_EVERY_MS);

  function failed(why) {
    const b = $('#error-banner');
    const since = state.lastOk ? ` Showing the data of ${clock(state.lastOk)}.` : '';
    b.textContent = `Cannot update: ${why}. Retrying every ${STATUS_EVERY_MS / 1000} s.${since}`;
    b.hidden = false;
    if (state.status) document.body.classList.add('stale');
  }

  // ---- sign-in -----------------------------------------------------------------------
  /**
   * Asks the open /v1/whoami about the stored token (or `candidate`): true when it may
   * read, false when a token is needed, null when the relay cannot tell (unreachable, or
   * without /v1/whoami: then a 401 from the polls shows the sign-in).
   */
  async function whoami(candidate) {
    let r;
    try { r = await api('GET', 'v1/whoami', candidate); } catch (_) { return null; }
    const w = r.json;
    if (!r.ok || !w || typeof w !== 'object' || !('tokens_required' in w)) return null;
    const ok = !(w.tokens_required === true && !w.role);
    if (ok || candidate === undefined) {
      update($('#who'), w.token ? [h('span', { class: 'muted' }, 'token '), String(w.token), ` (${text(w.role)})`] : '');
    }
    return ok;
  }

  /** Starts reading, or asks for a token first when the relay says one is needed. */
  async function begin() {
    statusPoll.stop();
    historyPoll.stop();
    if ((await whoami()) === false) { needToken(null); return; }
    statusPoll.run();
    historyPoll.run();
  }

  function needToken(r) {
    statusPoll.stop();
    historyPoll.stop();
    const had = token.get() !== '';
    const first = !state.signingIn;
    state.signingIn = true;
    state.status = null;
    state.history = null;
    $('#error-banner').hidden = true;
    render();
    renderCharts();
    $('#signin-why').textContent = had
      ? `The relay refused the token${r && r.json && r.json.error ? ` (${r.json.error})` : ''}. Enter another one.`
      : 'This relay\'s admin endpoint needs a token.';
    $('#signin-panel').hidden = false;
    $('#sign-out').hidden = !had;
    if (first) $('#token').focus();
  }

  function signedIn(value) {
    token.set(value);
    state.signingIn = false;
    $('#signin-panel').hidden = true;
    $('#sign-out').hidden = false;
    begin();
    const p = state.pending;
    state.pending = null;
    if (p) p();
  }

  function signOut() {
    token.clear();
    state.status = null;
    state.history = null;
    state.pending = null;
    $('#sign-out').hidden = true;
    render();
    renderCharts();
    update($('#who'));
    notice('ok', 'Signed out: the token was removed from this tab.');
    begin();
  }

  // ---- actions -----------------------------------------------------------------------
  function notice(kind, msg) {
    const n = $('#notice');
    n.className = kind;
    $('#notice-text').textContent = msg;
    n.hidden = false;
  }

  const enc = encodeURIComponent;

  /** Reads a replay start: a time (RFC 3339, UTC when no offset) or a position (SEQ.INDEX). */
  function askReplay(sink) {
    const dflt = rfc3339(new Date(Math.floor(Date.now() / 1000 - 15 * 60) * 1000));
    let answer = dflt;
    for (;;) {
      answer = window.prompt(`Replay sink ${sink} from when? A UTC time (RFC 3339, like ${dflt}) or a store position (SEQ.INDEX, like 1200.0).`, answer);
      if (answer === null) return null;
      const a = answer.trim();
      if (/^\d{1,20}(\.\d{1,20})?$/.test(a)) return { query: `from=${enc(a)}`, label: `position ${a}` };
      const m = /^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?)(Z|[+-]\d{2}:\d{2})?$/i.exec(a);
      const t = m ? Date.parse(`${m[1]}T${m[2].replace(/(\.\d{3})\d+$/, '$1')}${(m[3] || 'Z').toUpperCase()}`) : NaN;
      if (Number.isFinite(t)) {
        const when = rfc3339(new Date(t));
        return { query: `since=${enc(when)}`, label: when };
      }
      window.alert(`"${a}" is neither a time like ${dflt} nor a position like 1200.0.`);
    }
  }

  function askTable(source, preset) {
    let answer = preset || '';
    for (;;) {
      answer = window.prompt(`Resync which table of source ${source}? (schema.table)`, answer);
      if (answer === null) return null;
      const a = answer.trim();
      if (/^[^\s.]+\.[^\s]+$/.test(a)) return a;
      window.alert(`"${a}" is not a table name like public.orders.`);
    }
  }

  function act(d) {
    let path;
    let question;
    let label;
    switch (d.action) {
      case 'pause':
        question = `Pause sink ${d.sink}? It stops delivering to its target until resumed.`;
        path = `v1/sinks/${enc(d.sink)}/pause`;
        label = `Pause sink ${d.sink}`;
        break;
      case 'resume':
        question = `Resume sink ${d.sink}? It delivers again (a stopped sink retries the batch its target refused).`;
        path = `v1/sinks/${enc(d.sink)}/resume`;
        label = `Resume sink ${d.sink}`;
        break;
      case 'replay': {
        const from = askReplay(d.sink);
        if (!from) return;
        question = `Replay sink ${d.sink} from ${from.label}? It delivers everything from there again.`;
        path = `v1/sinks/${enc(d.sink)}/replay?${from.query}`;
        label = `Replay sink ${d.sink} from ${from.label}`;
        break;
      }
      case 'drain':
        question = `Drain session ${d.session} (tunnel ${d.tunnel}, node ${d.node})? relay-inner opens a new session at once; this one closes when its client streams finish.`;
        path = `v1/sessions/${enc(d.session)}/drain`;
        label = `Drain session ${d.session}`;
        break;
      case 'resync': {
        const table = askTable(d.source, d.table);
        if (!table) return;
        question = `Resync table ${table} of source ${d.source}? It is copied again while changes keep streaming.`;
        path = `v1/cdc/sources/${enc(d.source)}/resync?table=${enc(table)}`;
        label = `Resync ${table} of ${d.source}`;
        break;
      }
      case 'reload':
        question = `Reload the configuration of this ${state.role || 'relay'}${state.status && state.status.node ? ` (${state.status.node})` : ''}?`;
        path = 'v1/reload';
        label = 'Reload config';
        break;
      default:
        return;
    }
    if (!window.confirm(question)) return;
    post(path, label);
  }

  async function post(path, label) {
    notice('pending', `${label}…`);
    let r;
    try {
      r = await api('POST', path);
    } catch (e) {
      notice('error', `${label}: ${e.message}`);
      return;
    }
    if (r.status === 401) {
      state.pending = () => post(path, label);
      notice('error', `${label}: sign in first (401); it is sent once you have.`);
      needToken(r);
      return;
    }
    const what = r.status === 403 ? 'refused (403)' : `${r.status}${r.statusText ? ' ' + r.statusText : ''}`;
    const msg = answerText(r);
    notice(r.ok ? 'ok' : 'error', `${label}: ${what}${msg ? ' — ' + msg : ''}`);
    statusPoll.run();
  }

  // ---- wiring ------------------------------------------------------------------------
  function start() {
    document.addEventListener('click', (ev) => {
      const t = ev.target instanceof Element ? ev.target : null;
      if (!t) return;
      const b = t.closest('button[data-action]');
      if (b) {
        ev.preventDefault();
        if (!b.disabled) act({ ...b.dataset });
        return;
      }
      const x = t.closest('[data-expand]');
      if (x) {
        const k = x.getAttribute('data-expand');
        if (state.expanded.has(k)) state.expanded.delete(k); else state.expanded.add(k);
        render();
      }
    });
    document.addEventListener('mousemove', hover);
    $('#notice-close').addEventListener('click', () => { $('#notice').hidden = true; });
    $('#sign-out').addEventListener('click', (ev) => { ev.preventDefault(); signOut(); });
    $('#signin-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const input = $('#token');
      const v = input.value.trim();
      if (!v) { input.focus(); return; }
      const b = $('#sign-in');
      b.disabled = true;
      const ok = await whoami(v);
      b.disabled = false;
      if (ok === false) {
        $('#signin-why').textContent = 'The relay does not know this token. Enter another one.';
        input.select();
        return;
      }
      input.value = '';
      signedIn(v);
    });
    $('#sign-out').hidden = token.get() === '';
    renderCharts();
    begin();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
