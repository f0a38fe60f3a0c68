"""``GET /``: one small page (no build step, no external assets) to type a prompt, pick a size
and a seed, watch the blocks being generated (server-sent events of the images API with
``"stream": true``) and see the image. With ``--api-key`` the browser asks for it (HTTP Basic,
any user name, the key as the password) and sends it with the page's own requests."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bitdance-rt</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }
  main { max-width: 960px; margin: 0 auto; padding: 20px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  #model { color: #666; font-size: 13px; }
  form { display: grid; grid-template-columns: 1fr auto auto auto auto; gap: 8px;
         align-items: end; margin: 16px 0; }
  textarea { grid-column: 1 / -1; font: inherit; padding: 8px; min-height: 56px;
             border: 1px solid #bbb; border-radius: 6px; resize: vertical; }
  label { display: flex; flex-direction: column; font-size: 12px; color: #555; }
  select, input { font: inherit; padding: 5px; border: 1px solid #bbb; border-radius: 6px; }
  input { width: 110px; }
  button { font: inherit; padding: 7px 18px; border: 0; border-radius: 6px;
           background: #2d5be3; color: white; cursor: pointer; }
  button:disabled { background: #99a; cursor: default; }
  #bar { height: 8px; background: #ddd; border-radius: 4px; overflow: hidden; }
  #fill { height: 100%; width: 0; background: #2d5be3; transition: width .15s; }
  #status { margin: 8px 0; min-height: 1.4em; }
  #status.error { color: #b00020; }
  #result { display: block; max-width: 100%; margin-top: 12px; border-radius: 6px;
            box-shadow: 0 1px 6px rgba(0,0,0,.2); }
</style>
</head>
<body>
<main>
  <h1>BitDance</h1>
  <div id="model">loading the model list...</div>
  <form id="form">
    <textarea id="prompt" placeholder="Describe the image to draw" required></textarea>
    <span></span>
    <label>Size (width x height)<select id="size"></select></label>
    <label>Seed<input id="seed" type="number" min="0"></label>
    <label>Steps<input id="steps" type="number" min="1" placeholder="default"></label>
    <button id="go" type="submit">Generate</button>
  </form>
  <div id="bar"><div id="fill"></div></div>
  <div id="status" role="status"></div>
  <img id="result" alt="" hidden>
</main>
<script>
const $ = (id) => document.getElementById(id);
function say(text, error) {
  $("status").textContent = text; $("status").className = error ? "error" : "";
}

async function loadModels() {
  const r = await fetch("/v1/models");
  if (!r.ok) { say("cannot list models: HTTP " + r.status, true); return; }
  const m = (await r.json()).data[0];
  if (!m) { $("model").textContent = "the model is still loading; reload in a moment"; return; }
  $("model").textContent = m.id + (m.description ? ": " + m.description : "");
  for (const s of m.sizes) {
    const o = document.createElement("option");
    o.value = o.textContent = s; o.selected = s === m.default_size;
    $("size").appendChild(o);
  }
  $("steps").placeholder = "default " + m.defaults.steps;
  if (m.family === "imagenet")  // class-conditional: the prompt holds a class
    $("prompt").placeholder = "A class: an index from 0 to " + (m.num_classes - 1) +
      " or a name, e.g. golden retriever";
  $("seed").value = m.defaults.seed;  // the server's default seed (GET /v1/models)
}

async function generate(ev) {
  ev.preventDefault();
  const body = { prompt: $("prompt").value, size: $("size").value, stream: true };
  if ($("seed").value) body.seed = parseInt($("seed").value, 10);
  if ($("steps").value) body.steps = parseInt($("steps").value, 10);
  $("go").disabled = true; $("fill").style.width = "0"; say("sending...");
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/images/generations", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" } });
    if (!r.ok) {
      let msg = "HTTP " + r.status;
      try { msg = (await r.json()).error.message; } catch (e) {}
      say(msg, true); return;
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\\n\\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        let event = "message", data = "";
        for (const line of chunk.split("\\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        handle(event, JSON.parse(data), t0);
      }
    }
  } catch (e) {
    say("the connection failed: " + e, true);
  } finally {
    $("go").disabled = false;
  }
}

function handle(event, d, t0) {
  if (event === "image_generation.progress") {
    if (d.state === "queued") {
      say("queued" + (d.queue_position ? " (" + d.queue_position + " ahead)" : ""));
    } else if (d.blocks_total) {
      $("fill").style.width = (100 * d.blocks_done / d.blocks_total) + "%";
      say("block " + d.blocks_done + " / " + d.blocks_total +
          (d.blocks_done === d.blocks_total ? ", decoding" : "") +
          (d.batch_images > 1 ? " (in a batch of " + d.batch_images + " images)" : ""));
    } else say(d.state);
  } else if (event === "image_generation.completed") {
    $("result").src = "data:image/png;base64," + d.b64_json;
    $("result").alt = $("prompt").value; $("result").hidden = false;
    $("fill").style.width = "100%";
    const s = ((performance.now() - t0) / 1000).toFixed(1);
    say("done in " + s + " s, " + d.size + ", seed " + d.seed);
  } else if (event === "error") {
    say(d.error.message, true);
  }
}

$("form").addEventListener("submit", generate);
loadModels();
</script>
</body>
</html>
"""
