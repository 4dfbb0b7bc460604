// Validate glTF/GLB files with the Khronos glTF validator (npm "gltf-validator").
// Usage: NODE_PATH=<repo>/.tools/node_modules node tests/js/validate.mjs FILE [FILE ...]
// Prints one JSON object {FILE: report, ...} on stdout; exits 2 if the package is missing and 1 if the
// validator rejected a file outright (unreadable / not glTF), so the caller can tell the cases apart.
import { createRequire } from "module";
import { readFileSync } from "fs";
import { basename } from "path";

// ES-module imports ignore NODE_PATH; a CommonJS require made here honours it, so .tools can stay
// outside the repo's own node_modules.
const require = createRequire(import.meta.url);
let validator;
try {
  validator = require("gltf-validator");
} catch (e) {
  process.stderr.write(`gltf-validator not found (NODE_PATH=${process.env.NODE_PATH || ""}): ${e.message}\n`);
  process.exit(2);
}

const files = process.argv.slice(2);
if (files.length === 0) {
  process.stderr.write("usage: node tests/js/validate.mjs FILE [FILE ...]\n");
  process.exit(64);
}

const reports = {};
for (const file of files) {
  try {
    reports[file] = await validator.validateBytes(new Uint8Array(readFileSync(file)), {
      uri: basename(file),
      maxIssues: 0, // report every issue
      writeTimestamp: false,
    });
  } catch (e) {
    process.stderr.write(`validator rejected ${file}: ${e}\n`);
    process.exit(1);
  }
}
process.stdout.write(JSON.stringify(reports));
