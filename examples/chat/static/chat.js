// The example chat client: plain JavaScript over chatkeep's FastAPI router.
//
// One WebSocket per joined room (/api/rooms/{id}/live?after_seq=N): it streams every
// message after the last seq this page has, in order, then the room's live events. When a
// socket drops it reconnects from that seq, and the open room's messages are read again
// from PostgreSQL (edits and deletions made meanwhile are not in the message stream).
"use strict";

const PAGE = Number(new URLSearchParams(location.search).get("page")) || 30;
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem("chatkeep.token"),
  me: null,
  rooms: new Map(), // room id -> {room, unread, lastSeq, socket, online, retry}
  current: null, // the open room's id
  messages: new Map(), // the open room's shown messages: id -> message
  olderCursor: null,
  olderLoads: 0, // pages loaded by loadOlder in the open room (a resync must not undo them)
  members: new Map(), // the open room's members: id -> {username, online}
  typing: new Map(), // user id -> timer that forgets them
  editing: null, // the id of the message being edited
  lastTypingSent: 0,
};

// -- HTTP -----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`/api${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (response.status === 401 && state.me) logout();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function showError(id, error) {
  $(id).textContent = error ? String(error.message || error) : "";
}

// -- logging in -----------------------------------------------------------------------

async function login() {
  const found = await api("POST", "/auth/login", {
    email: $("email").value,
    password: $("password").value,
  });
  state.token = found.access_token;
  sessionStorage.setItem("chatkeep.token", state.token);
  await start(found.user);
}

$("auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  login().catch((error) => showError("auth-error", error));
});

$("register").addEventListener("click", () => {
  api("POST", "/auth/register", {
    email: $("email").value,
    username: $("username").value,
    password: $("password").value,
  })
    .then(login)
    .catch((error) => showError("auth-error", error));
});

function logout() {
  if (state.token) api("POST", "/auth/logout").catch(() => {});
  sessionStorage.removeItem("chatkeep.token");
  location.reload();
}

$("logout").addEventListener("click", logout);

async function start(me) {
  state.me = me;
  $("me").textContent = me.username;
  $("auth").hidden = true;
  $("chat").hidden = false;
  await Promise.all([loadRooms(), loadPublicRooms()]);
  const remembered = sessionStorage.getItem("chatkeep.room");
  if (remembered && state.rooms.has(remembered)) await openRoom(remembered);
}

// -- rooms ----------------------------------------------------------------------------

async function loadRooms() {
  const summaries = await api("GET", "/rooms");
  for (const summary of summaries) {
    let entry = state.rooms.get(summary.room.id);
    if (!entry) {
      entry = { room: summary.room, lastSeq: summary.room.last_seq, socket: null, retry: 0 };
      state.rooms.set(summary.room.id, entry);
      connect(summary.room.id);
    }
    if (summary.room.id === state.current) entry.unread = 0;
    // The server's count is the truth unless the socket has already brought newer ones.
    else if (summary.room.last_seq >= entry.lastSeq) entry.unread = summary.unread_count;
    entry.lastSeq = Math.max(entry.lastSeq, summary.room.last_seq);
  }
  renderRooms();
}

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren();
  for (const [id, entry] of state.rooms) {
    const item = document.createElement("li");
    item.dataset.roomId = id;
    item.className = id === state.current ? "current" : "";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `# ${entry.room.name}`;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = entry.unread > 0 ? String(entry.unread) : "";
    item.append(name, badge);
    item.addEventListener("click", () => openRoom(id));
    list.append(item);
  }
}

async function loadPublicRooms() {
  const rooms = await api("GET", "/public-rooms");
  const list = $("public-rooms");
  list.replaceChildren();
  for (const room of rooms) {
    if (state.rooms.has(room.id)) continue;
    const item = document.createElement("li");
    item.dataset.roomId = room.id;
    item.textContent = `# ${room.name}`;
    item.title = "Join";
    item.addEventListener("click", () => joinRoom(room.id));
    list.append(item);
  }
}

$("refresh-public").addEventListener("click", () => loadPublicRooms());

async function joinRoom(id) {
  await api("POST", `/rooms/${id}/join`);
  await loadRooms();
  await loadPublicRooms();
  await openRoom(id);
}

$("new-room").addEventListener("submit", (event) => {
  event.preventDefault();
  api("POST", "/rooms", { name: $("new-room-name").value })
    .then(async (room) => {
      $("new-room-name").value = "";
      await loadRooms();
      await openRoom(room.id);
    })
    .catch((error) => showError("room-error", error));
});

async function openRoom(id) {
  document.body.dataset.loaded = ""; // set to the room's id once its messages show
  state.current = id;
  sessionStorage.setItem("chatkeep.room", id);
  state.messages = new Map();
  state.olderCursor = null;
  state.olderLoads = 0;
  state.typing.clear();
  cancelEdit();
  const entry = state.rooms.get(id);
  $("room").hidden = false;
  $("room-name").textContent = `# ${entry.room.name}`;
  entry.unread = 0;
  renderRooms();
  renderMessages();
  renderConnection();
  renderTyping();
  await Promise.all([resync(), loadMembers()]);
  if (state.current !== id) return;
  document.body.dataset.loaded = id;
  scrollToBottom();
  markRead();
}

// -- the live connection of each room -------------------------------------------------

function connect(roomId) {
  const entry = state.rooms.get(roomId);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url =
    `${scheme}://${location.host}/api/rooms/${roomId}/live` +
    `?after_seq=${entry.lastSeq}&token=${encodeURIComponent(state.token)}`;
  const socket = new WebSocket(url);
  entry.socket = socket;
  socket.addEventListener("open", () => {
    entry.online = true;
    entry.retry = 0;
    if (roomId === state.current) {
      renderConnection();
      // Back after a drop: read the shown messages again for edits and deletions.
      resync();
      loadMembers();
    }
    // Other rooms: the socket streams what was missed, each message once, to count.
  });
  socket.addEventListener("message", (event) => received(roomId, JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    entry.online = false;
    if (entry.socket !== socket) return;
    entry.socket = null;
    if (roomId === state.current) renderConnection();
    if (event.code === 4401) return logout();
    if (event.code === 4403 || event.code === 4404 || event.code === 1000) {
      state.rooms.delete(roomId); // left the room, or it is gone
      renderRooms();
      return;
    }
    // Reconnect with backoff: 0.5 s, 1 s, 2 s ... at most 5 s; offline, when back online.
    const delay = Math.min(5000, 500 * 2 ** entry.retry++);
    setTimeout(() => reconnect(roomId, entry), delay);
  });
}

function reconnect(roomId, entry) {
  if (state.rooms.get(roomId) !== entry || entry.socket || !navigator.onLine) return;
  connect(roomId);
}

// The browser knows when the network is gone before a socket does (a socket over a dead
// link can stay open for a long time): close them all, and reconnect once it is back.
window.addEventListener("offline", () => {
  for (const entry of state.rooms.values()) {
    if (entry.socket) entry.socket.close(3000, "offline");
  }
});
window.addEventListener("online", () => {
  for (const [roomId, entry] of state.rooms) {
    entry.retry = 0;
    reconnect(roomId, entry);
  }
});

function received(roomId, item) {
  const entry = state.rooms.get(roomId);
  if (!entry) return;
  const isCurrent = roomId === state.current;
  if (item.kind === "message") {
    const message = item.message;
    const counted = message.seq <= entry.lastSeq; // already in the room list's count
    entry.lastSeq = Math.max(entry.lastSeq, message.seq);
    if (isCurrent) {
      const atBottom = nearBottom();
      state.messages.set(message.id, message);
      forgetTyping(message.user_id);
      renderMessages();
      if (atBottom) scrollToBottom();
      markRead();
    } else if (message.user_id !== state.me.id && !counted) {
      entry.unread += 1;
      renderRooms();
    }
  } else if (item.kind === "gap") {
    // Messages are caught up by the stream itself; edits and deletions are not.
    if (isCurrent) resync();
  } else if (item.kind === "event" && isCurrent) {
    roomEvent(item.event);
  }
}

function roomEvent(event) {
  switch (event.type) {
    case "message.edited": {
      const shown = state.messages.get(event.message_id);
      if (!shown) return;
      if (event.body === null || event.body === undefined) return void resync();
      shown.content = event.body;
      shown.is_edited = true;
      renderMessages();
      return;
    }
    case "message.deleted":
      state.messages.delete(event.message_id);
      renderMessages();
      return;
    case "typing":
      if (event.user_id === state.me.id) return;
      if (event.typing) rememberTyping(event.user_id);
      else forgetTyping(event.user_id);
      return;
    case "presence": {
      const member = state.members.get(event.user_id);
      if (member) {
        member.online = event.status === "online";
        renderMembers();
      }
      return;
    }
    case "member.joined":
    case "member.left":
      loadMembers();
      return;
    default:
      return; // read receipts are not shown by this example
  }
}

// Everything from the oldest shown message on, read again (pages of 200): what changed
// while the socket was away (edits, deletions) shows; messages that arrived on the socket
// meanwhile are kept.
async function resync() {
  const roomId = state.current;
  if (!roomId) return;
  const seqs = [...state.messages.values()].map((m) => m.seq);
  const olderLoads = state.olderLoads;
  const fresh = new Map();
  let readUpTo = 0;
  let readFrom = Infinity;
  if (seqs.length === 0) {
    const page = await api("GET", `/rooms/${roomId}/messages?limit=${PAGE}`);
    if (roomId !== state.current) return;
    for (const message of page.items) fresh.set(message.id, message);
    // An older page loaded while this one was on its way set the cursor further back.
    if (state.olderLoads === olderLoads) state.olderCursor = page.before;
    readUpTo = Math.max(0, ...page.items.map((m) => m.seq));
    readFrom = Math.min(readUpTo, ...page.items.map((m) => m.seq));
  } else {
    let path = `/rooms/${roomId}/messages?limit=200&after_seq=${Math.min(...seqs) - 1}`;
    for (;;) {
      const page = await api("GET", path);
      if (roomId !== state.current) return;
      for (const message of page.items) fresh.set(message.id, message);
      readUpTo = Math.max(readUpTo, ...page.items.map((m) => m.seq));
      if (!page.after) break;
      path = `/rooms/${roomId}/messages?limit=200&cursor=${encodeURIComponent(page.after)}`;
    }
  }
  readFrom = Math.min(readFrom, ...seqs);
  for (const [id, message] of state.messages) {
    // Kept: what arrived on the socket meanwhile, and older pages loaded meanwhile.
    if ((message.seq > readUpTo || message.seq < readFrom) && !fresh.has(id)) {
      fresh.set(id, message);
    }
  }
  const entry = state.rooms.get(roomId);
  entry.lastSeq = Math.max(entry.lastSeq, readUpTo);
  const atBottom = nearBottom();
  state.messages = fresh;
  renderMessages();
  if (atBottom) scrollToBottom();
}

async function loadOlder() {
  const roomId = state.current;
  if (!roomId || !state.olderCursor) return;
  const scroller = $("scroller");
  const before = scroller.scrollHeight - scroller.scrollTop;
  const page = await api(
    "GET",
    `/rooms/${roomId}/messages?limit=${PAGE}&cursor=${encodeURIComponent(state.olderCursor)}`,
  );
  if (roomId !== state.current) return;
  for (const message of page.items) state.messages.set(message.id, message);
  state.olderCursor = page.before;
  state.olderLoads += 1;
  renderMessages();
  scroller.scrollTop = scroller.scrollHeight - before; // keep the reader's place
}

$("load-older").addEventListener("click", () => loadOlder());
$("scroller").addEventListener("scroll", () => {
  if ($("scroller").scrollTop === 0) loadOlder();
});

let markReadTimer = null;
function markRead() {
  // At most once a second; only while the page is looked at.
  if (markReadTimer || document.visibilityState !== "visible") return;
  markReadTimer = setTimeout(() => {
    markReadTimer = null;
    if (state.current) api("POST", `/rooms/${state.current}/read`).catch(() => {});
  }, 1000);
}

// -- members, presence, typing --------------------------------------------------------

async function loadMembers() {
  const roomId = state.current;
  const members = await api("GET", `/rooms/${roomId}/members`);
  if (roomId !== state.current) return;
  state.members = new Map(members.map((m) => [m.id, m]));
  renderMembers();
}

function renderMembers() {
  const list = $("members");
  list.replaceChildren();
  for (const member of state.members.values()) {
    const item = document.createElement("li");
    item.dataset.userId = member.id;
    item.dataset.online = String(member.online);
    const dot = document.createElement("span");
    dot.className = member.online ? "dot online" : "dot";
    dot.title = member.online ? "online" : "offline";
    item.append(dot, member.username);
    list.append(item);
  }
}

function rememberTyping(userId) {
  clearTimeout(state.typing.get(userId));
  // The indicator expires by itself on the server too (about 5 s).
  state.typing.set(
    userId,
    setTimeout(() => forgetTyping(userId), 6000),
  );
  renderTyping();
}

function forgetTyping(userId) {
  if (!state.typing.has(userId)) return;
  clearTimeout(state.typing.get(userId));
  state.typing.delete(userId);
  renderTyping();
}

function renderTyping() {
  const names = [...state.typing.keys()].map(
    (id) => (state.members.get(id) || { username: "someone" }).username,
  );
  $("typing").textContent =
    names.length === 0 ? "" : `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing…`;
}

$("message-input").addEventListener("input", () => {
  const now = Date.now();
  if (!state.current || state.editing || now - state.lastTypingSent < 2000) return;
  state.lastTypingSent = now;
  api("POST", `/rooms/${state.current}/typing`, { typing: true }).catch(() => {});
});

// -- messages -------------------------------------------------------------------------

function renderMessages() {
  const list = $("messages");
  list.replaceChildren();
  const messages = [...state.messages.values()].sort((a, b) => a.seq - b.seq);
  for (const message of messages) {
    const mine = message.user_id === state.me.id;
    const item = document.createElement("li");
    item.dataset.id = message.id;
    item.dataset.seq = String(message.seq);
    item.dataset.author = message.user.username;
    item.className = mine ? "mine" : "";
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.user.username;
    const content = document.createElement("span");
    content.className = "content";
    content.textContent = message.content;
    item.append(author, content);
    if (message.is_edited) {
      const edited = document.createElement("span");
      edited.className = "edited";
      edited.textContent = "(edited)";
      item.append(edited);
    }
    if (mine) {
      const actions = document.createElement("span");
      actions.className = "actions";
      actions.append(
        button("edit", () => startEdit(message.id)),
        button("delete", () => deleteMessage(message.id)),
      );
      item.prepend(actions);
    }
    list.append(item);
  }
  $("load-older").hidden = !state.olderCursor;
}

function button(label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = label;
  element.textContent = label;
  element.addEventListener("click", onClick);
  return element;
}

function nearBottom() {
  const scroller = $("scroller");
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
}

function scrollToBottom() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

function startEdit(id) {
  state.editing = id;
  $("message-input").value = state.messages.get(id).content;
  $("send").textContent = "Save";
  $("cancel-edit").hidden = false;
  $("message-input").focus();
}

function cancelEdit() {
  state.editing = null;
  $("message-input").value = "";
  $("send").textContent = "Send";
  $("cancel-edit").hidden = true;
}

$("cancel-edit").addEventListener("click", cancelEdit);

async function deleteMessage(id) {
  await api("DELETE", `/messages/${id}`);
  state.messages.delete(id);
  renderMessages();
}

function newClientId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("message-input").value;
  if (!state.current || !content.trim()) return;
  const roomId = state.current;
  const editing = state.editing;
  const request = editing
    ? api("PATCH", `/messages/${editing}`, { content })
    : api("POST", `/rooms/${roomId}/messages`, { content, client_msg_id: newClientId() });
  request
    .then((message) => {
      showError("room-error", null);
      if (editing) cancelEdit();
      else $("message-input").value = "";
      if (roomId !== state.current) return;
      const shown = state.messages.get(message.id);
      state.messages.set(message.id, { ...message, user: shown ? shown.user : state.me });
      renderMessages();
      scrollToBottom();
      if (!editing) api("POST", `/rooms/${roomId}/typing`, { typing: false }).catch(() => {});
      state.lastTypingSent = 0;
    })
    .catch((error) => showError("room-error", error));
});

function renderConnection() {
  const entry = state.current && state.rooms.get(state.current);
  const online = Boolean(entry && entry.online);
  $("connection").className = online ? "online" : "offline";
  $("connection").textContent = online ? "connected" : "reconnecting…";
}

// -- start ----------------------------------------------------------------------------

if (state.token) {
  api("GET", "/me")
    .then(start)
    .catch(() => {
      sessionStorage.removeItem("chatkeep.token");
      state.token = null;
    });
}
