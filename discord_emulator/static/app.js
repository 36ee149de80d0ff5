// The demo page: the emulator's server drawn like Discord's client. Everything shown comes from the emulator over
// /_demo/events (a websocket: the whole state, then each change); what the page does goes through /_demo/ calls
// that act as the chosen user. No build step, no framework.

import { Composer } from "./composer.js";
import { escapeHtml } from "./markdown.js";
import { EPHEMERAL, ICONS, avatar, displayName, messageElement, noticeElement } from "./messages.js";

const TEXT = 0;
const THREADS = [11, 12];
const state = {
  bot: null,
  online: false,
  guilds: new Map(), // id -> {id, name, members, channels: Map, messages: Map(channelId -> Map(id -> msg)), commands}
  guildId: null,
  channelId: null,
  userId: null,
  streamed: new Set(), // message IDs seen while still streaming (data-streamed on their element)
  notices: new Map(), // channelId -> local notices ("did not respond", errors), shown to this page only
  dismissed: new Set(),
  unread: new Set(),
  failed: new Map(), // message ID -> "This interaction failed" after a click nobody answered
};

const $ = (selector) => document.querySelector(selector);
const guild = () => state.guilds.get(state.guildId);
const channel = (id = state.channelId) => guild()?.channels.get(id);
const member = (id) => guild()?.members.find((m) => m.id === id);

const names = {
  user: (id) => {
    const m = member(id);
    if (m) return m.nick || m.global_name || m.username;
    return state.bot && state.bot.id === id ? state.bot.username : null;
  },
  role: (id) => null,
  channel: (id) => {
    for (const g of state.guilds.values()) if (g.channels.has(id)) return g.channels.get(id).name;
    return null;
  },
};

const byId = (a, b) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0);
const view = { names, streamed: state.streamed, failed: state.failed };
const people = () => (guild()?.members || []).filter((m) => !m.bot);
const canSee = (c) => c && c.visible_to.includes(state.userId);

// --- talking to the emulator -----------------------------------------------------------------------------------
async function api(path, body) {
  const response = await fetch(`/_demo/${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: state.userId, channel_id: state.channelId, ...body }),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.message || `HTTP ${response.status}`);
  return data;
}

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/_demo/events`);
  socket.onmessage = (event) => apply(JSON.parse(event.data));
  socket.onopen = () => document.body.classList.remove("disconnected");
  socket.onclose = () => {
    document.body.classList.add("disconnected");
    setTimeout(connect, 1000); // the emulator restarting: the next connection sends the whole state again
  };
}

function apply(event) {
  if (event.type === "state") return loadState(event.state);
  if (event.type === "online") {
    state.online = event.online;
    renderMembers();
    renderOnline();
  } else if (event.type === "commands") {
    const g = state.guilds.get(event.guild_id);
    if (g) g.commands = event.commands;
  } else if (event.type === "channel") {
    const c = event.channel;
    const g = state.guilds.get(c.guild_id);
    if (!g) return;
    g.channels.set(c.id, c);
    if (!g.messages.has(c.id)) g.messages.set(c.id, new Map());
    renderSidebar();
    if (c.id === state.channelId) renderHeader();
  } else if (event.type === "message") {
    const m = event.message;
    const g = state.guilds.get(m.guild_id);
    if (!g) return;
    if (!g.messages.has(m.channel_id)) g.messages.set(m.channel_id, new Map());
    const isNew = !g.messages.get(m.channel_id).has(m.id);
    g.messages.get(m.channel_id).set(m.id, m);
    if (m.channel_id === state.channelId) upsertMessage(m);
    else if (isNew && visible(m)) {
      state.unread.add(m.channel_id);
      renderSidebar();
    }
  } else if (event.type === "delete") {
    for (const g of state.guilds.values()) g.messages.get(event.channel_id)?.delete(event.id);
    document.querySelector(`.message[data-id="${event.id}"]`)?.remove();
  }
}

function loadState(data) {
  state.bot = data.bot;
  state.online = data.online;
  state.guilds.clear();
  for (const g of data.guilds) {
    const messages = new Map();
    for (const [cid, list] of Object.entries(g.messages)) messages.set(cid, new Map(list.map((m) => [m.id, m])));
    state.guilds.set(g.id, { ...g, channels: new Map(g.channels.map((c) => [c.id, c])), messages });
  }
  if (!state.guilds.has(state.guildId)) state.guildId = data.guilds[0]?.id ?? null;
  const saved = localStorage.getItem("demo-user");
  if (!member(state.userId)) state.userId = member(saved) ? saved : people()[0]?.id ?? null;
  if (!channel()) state.channelId = firstChannel();
  renderAll();
}

function firstChannel() {
  const text = [...(guild()?.channels.values() || [])].filter((c) => c.type === TEXT && canSee(c));
  return text.sort((a, b) => a.position - b.position)[0]?.id ?? null;
}

// --- choosing who and where ------------------------------------------------------------------------------------
function selectChannel(id) {
  if (!guild()?.channels.has(id)) return;
  state.channelId = id;
  state.unread.delete(id);
  renderSidebar();
  renderHeader();
  renderMessages();
  composer.channelChanged();
}

function selectUser(id) {
  state.userId = id;
  localStorage.setItem("demo-user", id);
  if (!canSee(channel())) state.channelId = firstChannel();
  renderAll();
}

// --- drawing ---------------------------------------------------------------------------------------------------
function renderAll() {
  renderGuilds();
  renderSidebar();
  renderHeader();
  renderMembers();
  renderUserPanel();
  renderMessages();
  renderOnline();
}

function renderGuilds() {
  $("#guilds").innerHTML = [...state.guilds.values()]
    .map((g) => {
      const initials = g.name.split(/\s+/).map((w) => w[0]).join("").slice(0, 3);
      const active = g.id === state.guildId ? " active" : "";
      return `<button class="guild-icon${active}" data-guild="${g.id}" title="${escapeHtml(g.name)}">${escapeHtml(initials)}</button>`;
    })
    .join("");
  $("#guild-name").textContent = guild()?.name ?? "";
}

function renderSidebar() {
  const g = guild();
  if (!g) return;
  const all = [...g.channels.values()].filter(canSee);
  const rows = ['<div class="category">Text channels</div>'];
  for (const c of all.filter((c) => c.type === TEXT).sort((a, b) => a.position - b.position)) {
    rows.push(channelRow(c, "#", "channel"));
    const threads = all.filter((t) => THREADS.includes(t.type) && t.parent_id === c.id && !t.thread_metadata?.archived);
    for (const t of threads.sort((a, b) => byId(a.id, b.id))) rows.push(channelRow(t, "", "thread"));
  }
  $("#channel-list").innerHTML = rows.join("");
}

function channelRow(c, icon, kind) {
  const classes = [kind, c.id === state.channelId ? "active" : "", state.unread.has(c.id) ? "unread" : ""];
  const glyph = kind === "thread" ? '<span class="thread-branch"></span>' : `<span class="hash">${icon}</span>`;
  return `<a class="${classes.join(" ")}" href="#${c.id}" data-channel="${c.id}" title="${escapeHtml(c.name)}">${glyph}<span class="name">${escapeHtml(c.name)}</span></a>`;
}

function renderHeader() {
  const c = channel();
  if (!c) return;
  const parent = c.parent_id ? channel(c.parent_id) : null;
  const trail = parent ? `<span class="hash">#</span>${escapeHtml(parent.name)}<span class="crumb">›</span>${ICONS.thread} ` : '<span class="hash">#</span>';
  $("#channel-header").innerHTML = `<span class="title">${trail}${escapeHtml(c.name)}</span>` +
    (c.topic ? `<span class="topic">${escapeHtml(c.topic)}</span>` : "");
  document.title = `${parent ? "🧵" : "#"}${c.name} · ${guild().name}`;
}

function renderMembers() {
  const g = guild();
  if (!g) return;
  const online = g.members.filter((m) => !m.bot || state.online);
  const offline = g.members.filter((m) => m.bot && !state.online);
  const row = (m, isOnline) => `<div class="member ${isOnline ? "online" : "offline"}${m.bot ? " bot" : ""}" data-username="${escapeHtml(m.username)}">
      ${avatar(m)}<span class="member-name${m.admin ? " admin" : ""}">${escapeHtml(displayName(m))}</span>${m.bot ? '<span class="tag">APP</span>' : ""}</div>`;
  $("#members").innerHTML = `<div class="category">Online — ${online.length}</div>${online.map((m) => row(m, true)).join("")}` +
    (offline.length ? `<div class="category">Offline — ${offline.length}</div>${offline.map((m) => row(m, false)).join("")}` : "");
}

function renderUserPanel() {
  $("#user-picker").innerHTML = people()
    .map((m) => `<option value="${m.id}"${m.id === state.userId ? " selected" : ""}>${escapeHtml(displayName(m))}${m.admin ? " (admin)" : ""}</option>`)
    .join("");
  const me = member(state.userId);
  $("#user-avatar").outerHTML = me ? avatar(me, "user-avatar") : '<div id="user-avatar"></div>';
}

function renderOnline() {
  document.body.classList.toggle("bot-offline", !state.online);
  composer.setEnabled(state.online && Boolean(state.channelId));
}

function visible(m) {
  if (!(m.flags & EPHEMERAL)) return true;
  return m.interaction_metadata?.user?.id === state.userId && !state.dismissed.has(m.id);
}

function renderMessages() {
  const list = $("#messages");
  const c = channel();
  if (!c) {
    list.innerHTML = "";
    return;
  }
  const messages = [...(guild().messages.get(c.id)?.values() || [])].filter(visible).sort((a, b) => byId(a.id, b.id));
  const welcome = c.parent_id
    ? `<div class="welcome"><h2>${ICONS.thread} ${escapeHtml(c.name)}</h2><p>A thread in #${escapeHtml(channel(c.parent_id)?.name ?? "")}.</p></div>`
    : `<div class="welcome"><h2>Welcome to #${escapeHtml(c.name)}!</h2><p>${escapeHtml(c.topic || "This is the start of the channel.")}</p></div>`;
  list.innerHTML = welcome;
  for (const m of messages) list.append(messageElement(m, view));
  for (const notice of state.notices.get(c.id) || []) list.append(noticeElement(notice));
  list.scrollTop = list.scrollHeight;
}

function upsertMessage(m) {
  const list = $("#messages");
  const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const old = list.querySelector(`.message[data-id="${m.id}"]`);
  if (!visible(m)) {
    old?.remove();
    return;
  }
  const element = messageElement(m, view);
  if (old) old.replaceWith(element);
  else {
    const later = [...list.querySelectorAll(".message[data-id]")].find((e) => byId(e.dataset.id, m.id) > 0);
    list.insertBefore(element, later ?? list.querySelector(".notice"));
  }
  if (stick) list.scrollTop = list.scrollHeight;
}

function notice(text) {
  if (!state.channelId) return;
  const list = state.notices.get(state.channelId) || [];
  list.push(text);
  state.notices.set(state.channelId, list);
  const messages = $("#messages");
  messages.append(noticeElement(text));
  messages.scrollTop = messages.scrollHeight;
}

// --- clicks ----------------------------------------------------------------------------------------------------
async function useComponent(element, values) {
  const messageId = element.dataset.message;
  element.disabled = true;
  try {
    const answer = await api("components", { message_id: messageId, custom_id: element.dataset.customId, values });
    if (answer.responded) state.failed.delete(messageId);
    else state.failed.set(messageId, true);
  } catch (error) {
    notice(`That click did not go through: ${error.message}`);
  } finally {
    element.disabled = false;
    const m = guild().messages.get(state.channelId)?.get(messageId);
    if (m) upsertMessage(m);
  }
}

document.addEventListener("click", (event) => {
  const target = event.target.closest("[data-channel], [data-guild], [data-custom-id], [data-dismiss]");
  if (!target) return;
  if (target.dataset.customId && target.tagName === "BUTTON") {
    useComponent(target);
  } else if (target.dataset.dismiss) {
    state.dismissed.add(target.dataset.dismiss);
    target.closest(".message")?.remove();
  } else if (target.dataset.guild) {
    state.guildId = target.dataset.guild;
    state.channelId = firstChannel();
    renderAll();
  } else if (target.dataset.channel) {
    event.preventDefault();
    selectChannel(target.dataset.channel);
  }
});

document.addEventListener("change", (event) => {
  if (event.target.matches("select.select[data-custom-id]")) useComponent(event.target, [event.target.value]);
  if (event.target.id === "user-picker") selectUser(event.target.value);
});

const composer = new Composer($("#composer"), {
  api,
  notice,
  names,
  commands: () => guild()?.commands || [],
  channel: () => channel(),
  members: () => guild()?.members || [],
});
connect();
