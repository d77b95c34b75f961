// sign.mjs: signs webhook deliveries with the senders' own libraries, for
// tests/integration/test_webhook.py (so idemgate's verification is checked
// against code this project did not write).
//
// Reads JSON on stdin: one request or a list of them, each
//   {"scheme": "standard", "secret": "whsec_...", "id": "msg_1",
//    "timestamp": 1700000000, "body": "..."}   standardwebhooks' Webhook.sign
//   {"scheme": "github", "secret": "...", "body": "..."}
//                                              @octokit/webhooks-methods' sign
// and prints the headers the library produced as JSON (one object, or a list
// in the same order): webhook-id, webhook-timestamp and webhook-signature for
// "standard"; x-hub-signature-256 for "github".
//
// Run from the directory where `npm ci` installed package-lock.json (the
// ctest fixture copies this file there: ESM resolves packages next to the
// script).
import { Webhook } from "standardwebhooks";
import { sign as githubSign } from "@octokit/webhooks-methods";

async function signOne(req) {
  if (typeof req.body !== "string") throw new Error("body must be a string");
  switch (req.scheme) {
    case "standard": {
      const ts = new Date(Number(req.timestamp) * 1000);
      const signature = new Webhook(req.secret).sign(req.id, ts, req.body);
      return {
        "webhook-id": req.id,
        "webhook-timestamp": String(Math.floor(ts.getTime() / 1000)),
        "webhook-signature": signature,
      };
    }
    case "github":
      return { "x-hub-signature-256": await githubSign(req.secret, req.body) };
    default:
      throw new Error(`unknown scheme ${JSON.stringify(req.scheme)}`);
  }
}

async function main() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const out = Array.isArray(input)
    ? await Promise.all(input.map(signOne))
    : await signOne(input);
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => {
  process.stderr.write(`sign.mjs: ${e.message}\n`);
  process.exit(1);
});
