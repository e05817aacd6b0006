#!/usr/bin/env node
// Compile the Solidity test doubles in contracts/ with solc-js (pinned in package.json), offline.
//
//   node compile.js            writes build/<Name>.json ({contractName, abi, bytecode, ...})
//                              and prints the selectors of submitProofOfWork for v1 and v2
//   node compile.js --json     prints the same selectors as one JSON object instead
//
// Each artifact is written to a temporary file and renamed, so a reader (a test that compiles
// on demand, or a second compile running at the same time) never sees half a file.
"use strict";

const fs = require("fs");
const path = require("path");
const solc = require("solc");

const ROOT = __dirname;
const SOURCES = path.join(ROOT, "contracts");
const BUILD = path.join(ROOT, "build");
// Cancun is what Base and anvil both run; pinning it keeps the bytecode the same across solc
// releases whose default EVM version moves on.
const EVM_VERSION = "cancun";

function main(argv) {
  const sources = {};
  for (const name of fs.readdirSync(SOURCES).sort()) {
    if (name.endsWith(".sol")) {
      sources[name] = { content: fs.readFileSync(path.join(SOURCES, name), "utf8") };
    }
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      optimizer: { enabled: true, runs: 200 },
      // The public sessionJobs getters return 15 (v1) and 18 (v2) values: too deep for the
      // legacy code generator, as for the public contracts, which are built via IR too.
      viaIR: true,
      evmVersion: EVM_VERSION,
      outputSelection: {
        "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "evm.methodIdentifiers"] },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const message of output.errors || []) {
    process.stderr.write(message.formattedMessage + "\n");
  }
  if (errors.length > 0) {
    return 1;
  }

  fs.mkdirSync(BUILD, { recursive: true });
  const selectors = {};
  for (const [file, contracts] of Object.entries(output.contracts)) {
    for (const [name, compiled] of Object.entries(contracts)) {
      if (compiled.evm.bytecode.object === "") {
        continue; // an interface: nothing to deploy
      }
      const artifact = {
        contractName: name,
        sourceName: `contracts/${file}`,
        compiler: `solc-js ${solc.version()}`,
        evmVersion: EVM_VERSION,
        abi: compiled.abi,
        bytecode: "0x" + compiled.evm.bytecode.object,
        deployedBytecode: "0x" + compiled.evm.deployedBytecode.object,
        methodIdentifiers: compiled.evm.methodIdentifiers,
      };
      const target = path.join(BUILD, `${name}.json`);
      const temporary = `${target}.${process.pid}.tmp`;
      fs.writeFileSync(temporary, JSON.stringify(artifact, null, 2) + "\n");
      fs.renameSync(temporary, target);
      for (const [signature, selector] of Object.entries(compiled.evm.methodIdentifiers)) {
        if (signature.startsWith("submitProofOfWork(")) {
          selectors[name] = { signature, selector: "0x" + selector };
        }
      }
    }
  }

  if (argv.includes("--json")) {
    process.stdout.write(JSON.stringify(selectors) + "\n");
  } else {
    process.stdout.write(`compiled ${Object.keys(sources).length} sources with solc ${solc.version()} into ${BUILD}\n`);
    for (const [name, { signature, selector }] of Object.entries(selectors)) {
      process.stdout.write(`${name}: ${signature} selector ${selector}\n`);
    }
  }
  return 0;
}

function findImport(importPath) {
  // Contracts import each other by relative path only; nothing is fetched.
  const candidate = path.join(SOURCES, importPath);
  if (fs.existsSync(candidate)) {
    return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: `not found: ${importPath}` };
}

process.exitCode = main(process.argv.slice(2));
