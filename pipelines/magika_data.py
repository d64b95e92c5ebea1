"""Synthetic, labelled files of known content types for magika's standard_v3_3 model.

magika (Google's file-type detector, the `magika` pip package) ships an ONNX model that reads the
first and last 1,024 bytes of a file and scores 214 content types. To evaluate and calibrate
quantized versions of it offline, this module writes files in memory: source code, markup, data
and config formats, prose, images (Pillow), PDFs, archives and compressed streams (stdlib), audio
and a few other binary formats, all from seeded random words and structures. Sizes run from a
few hundred bytes to well past magika's 4 KB read block, so short files padded with token 256 and
long ones whose beginning and end are read apart both occur.

Each file's label is the type it truly is, as an index into the model's `target_labels_space`
(read from the config inside the package). Features come from magika's own extraction code, so
the model sees exactly what `Magika().identify_bytes()` would give it. The `bytes` input is int32,
the model's declared input type (magika passes Python ints and ORT converts them).

Nothing depends on the machine or the clock: the only file read is the package's model config,
and archive and PDF dates are fixed. Two runs give bit-identical arrays, as long as the library
versions are the same (another zlib, libjpeg or libwebp build may compress differently).
"""

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import pickle
import random
import struct
import tarfile
import time
import wave
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import magika
import numpy as np
from magika import Magika
from magika.types.seekable import Seekable
from PIL import Image, ImageDraw

EVAL_SEED, CALIB_SEED = 3003, 4004
EVAL_FILES, CALIB_FILES = 416, 128  # 13 and 4 full batches
BATCH_SIZE = 32
MODEL_DIR = Path(magika.__file__).parent / "models" / "standard_v3_3"
# Archive members and PDFs carry dates; a fixed one keeps the bytes independent of the clock.
FIXED_DATE = (2023, 5, 17, 10, 30, 0)
FIXED_EPOCH = 1684319400

# ---------------------------------------------------------------------------------------------
# Vocabulary. Plain English and programmer's words, so identifiers, comments and prose read like
# the real thing; the model has seen mostly real-world files.

_PROSE = """the of and to in is that for it as was with be by on not this are or from at which
but have an they were there been one all their has would when if so no will more other about what
its into than them can only some could new time these two may first then any like now over such
our even most made after also did many before must through back years where much way well down
should because each just those people how little state good very make world still own see work
long here get both between life being under never day same another know while last might great
old year off come since against came right used take three report system market water during
company policy number public group data method result value table section model process design
account price order total service quality level field energy control sample research analysis
material product measure period source history member board committee agreement contract payment
customer office meeting letter notice page chapter review budget project schedule income balance
river garden morning window family village winter summer travel station kitchen music doctor
student teacher question answer problem evening weather mountain island library hospital""".split()
_NOUNS = """user item order count value index name path config data buffer result node list table
record file line key size total price amount token session request response client server queue
cache entry event message payload header status score weight limit offset batch frame image
account customer invoice report metric sample vector matrix point edge graph tree child parent
host port timeout retry handler worker task job model layer input output state context""".split()
_VERBS = """get set load save parse build update compute find read write check create delete send
open close render validate format merge split sort filter apply reset init handle process fetch
convert encode decode resolve register emit collect flush""".split()
_FIRST = """James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara
Richard Susan Joseph Jessica Thomas Sarah Charles Karen Daniel Nancy Matthew Lisa Anthony Betty
Mark Sandra Paul Ashley Steven Emily Andrew Donna Kenneth Michelle Joshua Carol Kevin Amanda Brian
Melissa George Deborah Aisha Chen Yuki Olga Pedro Fatima Ivan Priya Lars Ingrid""".split()
_LAST = """Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez
Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green
Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Kowalski Tanaka Muller Rossi""".split()
_CITIES = """London Paris Berlin Madrid Rome Vienna Prague Warsaw Lisbon Dublin Oslo Stockholm
Helsinki Athens Zurich Tokyo Osaka Seoul Beijing Sydney Toronto Chicago Boston Denver Austin
Seattle Portland Lagos Nairobi Cairo Lima Bogota Santiago Mumbai Delhi Jakarta Manila""".split()


def _word(rng):
    return rng.choice(_PROSE)


def _sentence(rng, low=5, high=16):
    words = [_word(rng) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + rng.choice("....!?")


def _paragraph(rng, low=2, high=6):
    return " ".join(_sentence(rng) for _ in range(rng.randint(low, high)))


def _snake(rng):
    return f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"


def _camel(rng):
    return rng.choice(_VERBS) + rng.choice(_NOUNS).capitalize()


def _pascal(rng):
    return rng.choice(_NOUNS).capitalize() + rng.choice(_NOUNS).capitalize()


def _name(rng):
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _email(rng):
    return f"{rng.choice(_FIRST).lower()}.{rng.choice(_LAST).lower()}@{rng.choice(_NOUNS)}.com"


def _date(rng):
    return f"{rng.randint(2015, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _text_size(rng):
    """Log-uniform between 300 B and 14 KB: a third of the files fit in one 1 KB feature window,
    a third are bigger than magika's 4 KB read block, where beginning and end no longer overlap."""
    return int(math.exp(rng.uniform(math.log(300), math.log(14000))))


def _grow(rng, head, block, tail, joiner="\n"):
    """Header, then `block(rng)` chunks until the text reaches a random size, then the footer."""
    target, parts = _text_size(rng), [head]
    size = len(head)
    while size < target:
        parts.append(block(rng))
        size += len(parts[-1]) + len(joiner)
    parts.append(tail)
    return joiner.join(parts).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Source code. Each language gets its usual file header and a mix of its common constructs.


def _python_function(rng, indent=""):
    name, arg, other = _snake(rng), rng.choice(_NOUNS), rng.choice(_NOUNS) + "s"
    out = rng.choice(["result", "total", "items", "value"])
    body = rng.choice(
        [
            f"    {out} = []\n    for {arg} in {other}:\n        if {arg} is None:\n            continue\n"
            f"        {out}.append({arg} * {rng.randint(2, 9)})\n    return {out}",
            f'    if not {other}:\n        raise ValueError("{_sentence(rng, 3, 6)[:-1]}")\n'
            f"    return {{k: v for k, v in {other}.items() if v > {rng.randint(0, 99)}}}",
            f'    try:\n        with open({arg}, "r", encoding="utf-8") as fh:\n'
            f"            {out} = json.load(fh)\n    except OSError as exc:\n"
            f'        logger.warning("could not read %s: %s", {arg}, exc)\n        return None\n    return {out}',
            f"    {out} = sum(x.{rng.choice(_NOUNS)} for x in {other})\n"
            f'    logger.debug("{_snake(rng)}: %d", {out})\n    return {out} / max(len({other}), 1)',
            f"    {out} = sorted({other}, key=lambda x: x[{rng.randint(0, 3)}], reverse=True)\n"
            f"    return {out}[:{rng.randint(3, 50)}]",
        ]
    )
    doc = f'    """{_sentence(rng)}"""\n' if rng.random() < 0.6 else ""
    text = f"def {name}({arg}, {other}=None):\n{doc}{body}\n"
    return "\n".join(indent + line if line else line for line in text.split("\n"))


def _python_class(rng):
    cls, a, b = _pascal(rng), rng.choice(_NOUNS), rng.choice(_NOUNS) + "_count"
    methods = "\n".join(_python_function(rng, "    ").replace("(", "(self, ", 1) for _ in range(rng.randint(1, 3)))
    return (
        f'class {cls}:\n    """{_sentence(rng)}"""\n\n'
        f"    def __init__(self, {a}, {b}={rng.randint(0, 10)}):\n        self.{a} = {a}\n"
        f"        self.{b} = {b}\n        self._cache = {{}}\n\n{methods}"
    )


def _python(rng):
    imports = rng.sample(
        [
            "import os",
            "import sys",
            "import json",
            "import logging",
            "import re",
            "from pathlib import Path",
            "from typing import Optional",
            "import argparse",
            "from collections import defaultdict",
        ],
        4,
    )
    head = (
        ("#!/usr/bin/env python3\n" if rng.random() < 0.3 else "")
        + f'"""{_sentence(rng)}"""\n\n'
        + "\n".join(sorted(imports))
        + "\nimport json\nimport logging\n\nlogger = logging.getLogger(__name__)\n"
    )
    tail = (
        f'\n\nif __name__ == "__main__":\n    logging.basicConfig(level=logging.INFO)\n'
        f"    {_snake(rng)}(sys.argv[1:])\n"
        if rng.random() < 0.5
        else ""
    )
    return _grow(rng, head, lambda r: "\n" + (_python_class(r) if r.random() < 0.3 else _python_function(r)), tail)


def _js_function(rng):
    name, arg, items = _camel(rng), rng.choice(_NOUNS), rng.choice(_NOUNS) + "s"
    return rng.choice(
        [
            f"function {name}({arg}, {items}) {{\n  const result = [];\n  for (const item of {items}) {{\n"
            f"    if (item.{rng.choice(_NOUNS)} === {arg}) {{\n      result.push(item);\n    }}\n  }}\n"
            f"  return result;\n}}\n",
            f"const {name} = async ({arg}) => {{\n  const response = await fetch(`/api/{rng.choice(_NOUNS)}/${{{arg}}}`);\n"
            f"  if (!response.ok) {{\n    throw new Error('{_sentence(rng, 3, 6)[:-1]}');\n  }}\n"
            f"  return response.json();\n}};\n",
            f"function {name}({items}) {{\n  return {items}\n    .filter((x) => x.{rng.choice(_NOUNS)} > {rng.randint(0, 99)})\n"
            f"    .map((x) => ({{ ...x, {rng.choice(_NOUNS)}: x.{rng.choice(_NOUNS)} * {rng.randint(2, 9)} }}));\n}}\n",
            f"document.querySelector('#{rng.choice(_NOUNS)}').addEventListener('click', (event) => {{\n"
            f"  event.preventDefault();\n  {_camel(rng)}(event.target.dataset.{rng.choice(_NOUNS)});\n"
            f"  console.log('{_sentence(rng, 2, 5)[:-1]}');\n}});\n",
            f"class {_pascal(rng)} {{\n  constructor({arg}) {{\n    this.{arg} = {arg};\n    this.{items} = [];\n  }}\n\n"
            f"  {name}(value) {{\n    this.{items}.push(value);\n    return this;\n  }}\n}}\n",
        ]
    )


def _javascript(rng):
    head = rng.choice(["'use strict';\n", "/* eslint-disable no-console */\n", ""]) + "\n".join(
        f"const {n} = require('{n}');" for n in rng.sample(["fs", "path", "http", "util", "events"], 2)
    )
    tail = f"\nmodule.exports = {{ {_camel(rng)}, {_camel(rng)} }};\n"
    return _grow(rng, head + "\n", _js_function, tail)


def _c_function(rng):
    name, a, n = _snake(rng), rng.choice(_NOUNS), rng.randint(2, 64)
    return rng.choice(
        [
            f"static int {name}(const char *{a}, size_t len)\n{{\n    size_t i;\n    int sum = 0;\n\n"
            f"    if ({a} == NULL)\n        return -1;\n    for (i = 0; i < len; i++) {{\n"
            f"        sum += (unsigned char){a}[i] * {n};\n    }}\n    return sum;\n}}\n",
            f"/* {_sentence(rng)} */\nint {name}(struct {rng.choice(_NOUNS)} *{a})\n{{\n"
            f'    if (!{a}) {{\n        fprintf(stderr, "{name}: null {a}\\n");\n        return -EINVAL;\n    }}\n'
            f"    {a}->{rng.choice(_NOUNS)} = {n};\n    memset({a}->{rng.choice(_NOUNS)}, 0, sizeof({a}->{rng.choice(_NOUNS)}));\n"
            f"    return 0;\n}}\n",
            f"void {name}(double *{a}, int n)\n{{\n    int i;\n    double total = 0.0;\n\n"
            f'    for (i = 0; i < n; ++i)\n        total += {a}[i];\n    printf("%s: %f\\n", "{a}", total / n);\n}}\n',
            f"struct {rng.choice(_NOUNS)}_{rng.choice(_NOUNS)} {{\n    int {rng.choice(_NOUNS)};\n"
            f"    char {rng.choice(_NOUNS)}[{n}];\n    unsigned long {rng.choice(_NOUNS)};\n"
            f"    struct {rng.choice(_NOUNS)} *next;\n}};\n",
        ]
    )


def _c(rng):
    head = (
        f"/*\n * {_sentence(rng)}\n */\n\n"
        + "\n".join(
            f"#include <{h}>"
            for h in rng.sample(["stdio.h", "stdlib.h", "string.h", "errno.h", "stdint.h", "unistd.h"], 4)
        )
        + f"\n\n#define {rng.choice(_NOUNS).upper()}_MAX {rng.randint(16, 4096)}\n"
    )
    tail = (
        "\nint main(int argc, char **argv)\n{\n    if (argc < 2) {\n"
        '        fprintf(stderr, "usage: %s FILE\\n", argv[0]);\n        return 1;\n    }\n'
        f"    return {_snake(rng)}(argv[1], strlen(argv[1])) < 0;\n}}\n"
    )
    return _grow(rng, head, _c_function, tail)


def _java_method(rng):
    name, a, cls = _camel(rng), rng.choice(_NOUNS), _pascal(rng)
    return rng.choice(
        [
            f"    public List<{cls}> {name}(List<{cls}> {a}s) {{\n        List<{cls}> result = new ArrayList<>();\n"
            f"        for ({cls} {a} : {a}s) {{\n            if ({a}.get{rng.choice(_NOUNS).capitalize()}() > {rng.randint(0, 99)}) {{\n"
            f"                result.add({a});\n            }}\n        }}\n        return result;\n    }}\n",
            f"    /**\n     * {_sentence(rng)}\n     */\n    private static int {name}(String {a}) {{\n"
            f'        if ({a} == null || {a}.isEmpty()) {{\n            throw new IllegalArgumentException("{a} is empty");\n'
            f"        }}\n        return {a}.length() * {rng.randint(2, 9)};\n    }}\n",
            f'    @Override\n    public String toString() {{\n        return "{cls}{{" + "{a}=" + {a} + \'}}\';\n    }}\n',
            f"    public void {name}(Map<String, Integer> {a}) throws IOException {{\n"
            f"        for (Map.Entry<String, Integer> e : {a}.entrySet()) {{\n"
            f'            LOGGER.info("{{}} -> {{}}", e.getKey(), e.getValue());\n        }}\n    }}\n',
        ]
    )


def _java(rng):
    cls, pkg = _pascal(rng), f"com.{rng.choice(_NOUNS)}.{rng.choice(_NOUNS)}"
    head = (
        f"package {pkg};\n\nimport java.io.IOException;\nimport java.util.ArrayList;\n"
        f"import java.util.List;\nimport java.util.Map;\nimport org.slf4j.Logger;\n"
        f"import org.slf4j.LoggerFactory;\n\n/**\n * {_sentence(rng)}\n */\npublic class {cls} {{\n"
        f"    private static final Logger LOGGER = LoggerFactory.getLogger({cls}.class);\n"
        f"    private final String {rng.choice(_NOUNS)};\n"
    )
    return _grow(rng, head, _java_method, "}\n")


def _go_function(rng):
    name, a = _camel(rng).capitalize(), rng.choice(_NOUNS)
    return rng.choice(
        [
            f"// {name} {_sentence(rng).lower()}\nfunc {name}({a} string) (int, error) {{\n"
            f'\tif {a} == "" {{\n\t\treturn 0, fmt.Errorf("empty {a}")\n\t}}\n'
            f"\tn, err := strconv.Atoi({a})\n\tif err != nil {{\n\t\treturn 0, err\n\t}}\n\treturn n * {rng.randint(2, 9)}, nil\n}}\n",
            f"func (s *Server) {name}(w http.ResponseWriter, r *http.Request) {{\n"
            f'\t{a} := r.URL.Query().Get("{a}")\n\tif {a} == "" {{\n'
            f'\t\thttp.Error(w, "missing {a}", http.StatusBadRequest)\n\t\treturn\n\t}}\n'
            f'\tfmt.Fprintf(w, "%s\\n", {a})\n}}\n',
            f'type {_pascal(rng)} struct {{\n\t{rng.choice(_NOUNS).capitalize()} string `json:"{rng.choice(_NOUNS)}"`\n'
            f'\t{rng.choice(_NOUNS).capitalize()} int `json:"{rng.choice(_NOUNS)}"`\n}}\n',
            f"func {name}({a}s []int) int {{\n\ttotal := 0\n\tfor _, v := range {a}s {{\n\t\ttotal += v\n\t}}\n\treturn total\n}}\n",
        ]
    )


def _go(rng):
    head = (
        f'package {rng.choice(["main", rng.choice(_NOUNS)])}\n\nimport (\n\t"fmt"\n\t"net/http"\n'
        f'\t"strconv"\n)\n\ntype Server struct {{\n\taddr string\n}}\n'
    )
    return _grow(rng, head, _go_function, "")


def _rust_function(rng):
    name, a = _snake(rng), rng.choice(_NOUNS)
    return rng.choice(
        [
            f"/// {_sentence(rng)}\npub fn {name}({a}: &str) -> Result<u32, ParseIntError> {{\n"
            f"    let value = {a}.trim().parse::<u32>()?;\n    Ok(value * {rng.randint(2, 9)})\n}}\n",
            f"fn {name}({a}s: &[i64]) -> i64 {{\n    {a}s.iter().filter(|x| **x > {rng.randint(0, 99)}).sum()\n}}\n",
            f"#[derive(Debug, Clone, PartialEq)]\npub struct {_pascal(rng)} {{\n    pub {a}: String,\n"
            f"    pub {rng.choice(_NOUNS)}: Vec<u8>,\n    {rng.choice(_NOUNS)}: Option<usize>,\n}}\n",
            f"impl {_pascal(rng)} {{\n    pub fn new({a}: String) -> Self {{\n        Self {{ {a}, ..Default::default() }}\n    }}\n\n"
            f"    pub fn {name}(&mut self) -> Option<&str> {{\n        match self.{a}.as_str() {{\n"
            f'            "" => None,\n            s => Some(s),\n        }}\n    }}\n}}\n',
        ]
    )


def _rust(rng):
    head = "use std::collections::HashMap;\nuse std::num::ParseIntError;\nuse std::fmt;\n"
    tail = (
        f"\n#[cfg(test)]\nmod tests {{\n    use super::*;\n\n    #[test]\n    fn it_works() {{\n"
        f'        assert_eq!({_snake(rng)}("{rng.randint(1, 99)}").unwrap(), {rng.randint(1, 999)});\n    }}\n}}\n'
    )
    return _grow(rng, head, _rust_function, tail)


def _php_function(rng):
    name, a = _camel(rng), rng.choice(_NOUNS)
    return rng.choice(
        [
            f"function {name}(${a}, array $options = [])\n{{\n    if (empty(${a})) {{\n"
            f"        return null;\n    }}\n    $result = array_map(function ($x) {{ return $x * {rng.randint(2, 9)}; }}, ${a});\n"
            f"    return $result;\n}}\n",
            f"    public function {name}(Request $request)\n    {{\n        ${a} = $request->input('{a}');\n"
            f"        $this->{rng.choice(_NOUNS)}->save(${a});\n        return redirect('/{rng.choice(_NOUNS)}');\n    }}\n",
            f'$sql = "SELECT * FROM {rng.choice(_NOUNS)}s WHERE id = ?";\n$stmt = $pdo->prepare($sql);\n'
            f"$stmt->execute([$_GET['{a}']]);\nforeach ($stmt->fetchAll() as $row) {{\n"
            f"    echo '<li>' . htmlspecialchars($row['{rng.choice(_NOUNS)}']) . '</li>';\n}}\n",
        ]
    )


def _php(rng):
    head = f"<?php\n\nnamespace App\\{_pascal(rng)};\n\nuse App\\Models\\{_pascal(rng)};\n\n// {_sentence(rng)}\n"
    return _grow(rng, head, _php_function, "")


def _ruby_method(rng):
    name, a = _snake(rng), rng.choice(_NOUNS)
    return rng.choice(
        [
            f"  def {name}({a})\n    return nil if {a}.nil?\n\n    {a}.map {{ |x| x * {rng.randint(2, 9)} }}.select(&:positive?)\n  end\n",
            f"  # {_sentence(rng)}\n  def {name}\n    @{a} ||= {_pascal(rng)}.where({rng.choice(_NOUNS)}: params[:{a}]).first\n  end\n",
            f'  def {name}(*{a}s)\n    {a}s.each do |item|\n      puts "#{{item}}: {_word(rng)}"\n    end\n  end\n',
        ]
    )


def _ruby(rng):
    head = (
        f"# frozen_string_literal: true\n\nrequire '{rng.choice(['json', 'set', 'yaml'])}'\n\n"
        f"class {_pascal(rng)} < {rng.choice(['ApplicationRecord', 'Base', 'StandardError'])}\n"
        f"  attr_reader :{rng.choice(_NOUNS)}, :{rng.choice(_NOUNS)}\n"
    )
    return _grow(rng, head, _ruby_method, "end\n")


def _shell_block(rng):
    var, a = rng.choice(_NOUNS).upper(), rng.choice(_NOUNS)
    return rng.choice(
        [
            f'{_snake(rng)}() {{\n    local {a}="$1"\n    if [ -z "${a}" ]; then\n'
            f'        echo "error: missing {a}" >&2\n        return 1\n    fi\n    echo "{_sentence(rng, 2, 5)} ${a}"\n}}\n',
            f'for f in "${var}"/*.{rng.choice(["log", "txt", "csv"])}; do\n    [ -f "$f" ] || continue\n'
            f'    gzip -9 "$f"\ndone\n',
            f'if [ ! -d "${var}" ]; then\n    mkdir -p "${var}"\nfi\ncd "${var}" || exit 1\n',
            f'{var}="${{{var}:-/var/lib/{a}}}"\nexport {var}\n',
            f'case "$1" in\n    start)\n        {_snake(rng)} "$@"\n        ;;\n    stop)\n'
            f'        kill "$(cat /run/{a}.pid)"\n        ;;\n    *)\n        echo "usage: $0 {{start|stop}}"\n        exit 2\n        ;;\nesac\n',
        ]
    )


def _shell(rng):
    head = f"#!/bin/{rng.choice(['bash', 'sh', 'bash'])}\n# {_sentence(rng)}\nset -eu\n"
    return _grow(rng, head, _shell_block, "")


def _css_rule(rng):
    sel = rng.choice(
        [
            f".{rng.choice(_NOUNS)}-{rng.choice(_NOUNS)}",
            f"#{rng.choice(_NOUNS)}",
            f"{rng.choice(['div', 'ul', 'a', 'p', 'h2', 'button'])}.{rng.choice(_NOUNS)}",
            f".{rng.choice(_NOUNS)} > {rng.choice(['li', 'span', 'a'])}:hover",
        ]
    )
    props = rng.sample(
        [
            f"color: #{rng.randrange(16**6):06x};",
            f"margin: {rng.randint(0, 32)}px {rng.randint(0, 32)}px;",
            f"padding: {rng.randint(0, 24)}px;",
            f"font-size: {rng.randint(10, 32)}px;",
            f"display: {rng.choice(['flex', 'block', 'inline-block', 'grid', 'none'])};",
            f"border: 1px solid #{rng.randrange(16**3):03x};",
            f"width: {rng.randint(10, 100)}%;",
            f"background-color: rgba({rng.randint(0, 255)}, {rng.randint(0, 255)}, {rng.randint(0, 255)}, 0.{rng.randint(1, 9)});",
            f"font-weight: {rng.choice(['400', '600', 'bold'])};",
            "box-sizing: border-box;",
            f"line-height: 1.{rng.randint(2, 8)};",
            f"border-radius: {rng.randint(2, 12)}px;",
        ],
        rng.randint(2, 6),
    )
    return sel + " {\n  " + "\n  ".join(props) + "\n}\n"


def _css(rng):
    return _grow(rng, f"/* {_sentence(rng)} */\n", _css_rule, "")


# ---------------------------------------------------------------------------------------------
# Markup, data and configuration formats.


def _html_block(rng):
    return rng.choice(
        [
            f"    <p>{_paragraph(rng)}</p>",
            f"    <h2>{_sentence(rng, 2, 6)[:-1]}</h2>",
            "    <ul>\n"
            + "\n".join(
                f'      <li><a href="/{rng.choice(_NOUNS)}/{rng.randint(1, 999)}">{_sentence(rng, 2, 5)[:-1]}</a></li>'
                for _ in range(rng.randint(2, 6))
            )
            + "\n    </ul>",
            f'    <div class="{rng.choice(_NOUNS)}">\n      <img src="/img/{rng.choice(_NOUNS)}.png" '
            f'alt="{_word(rng)}" width="{rng.randint(50, 800)}">\n      <span>{_sentence(rng)}</span>\n    </div>',
        ]
    )


def _html(rng):
    head = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n'
        f"  <title>{_sentence(rng, 2, 6)[:-1]}</title>\n"
        f'  <link rel="stylesheet" href="/css/{rng.choice(_NOUNS)}.css">\n</head>\n<body>\n'
        f"  <main>"
    )
    return _grow(rng, head, _html_block, "  </main>\n</body>\n</html>\n")


def _xml_record(rng):
    tag, field = rng.choice(_NOUNS), rng.choice(_NOUNS)
    return (
        f'  <{tag} id="{rng.randint(1, 99999)}">\n    <name>{_name(rng)}</name>\n'
        f"    <{field}>{rng.randint(0, 10**6)}</{field}>\n    <date>{_date(rng)}</date>\n"
        f"    <note>{_sentence(rng)}</note>\n  </{tag}>"
    )


def _xml(rng):
    root = rng.choice(_NOUNS) + "s"
    head = f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} version="{rng.randint(1, 5)}.0">'
    return _grow(rng, head, _xml_record, f"</{root}>\n")


def _svg_shape(rng):
    fill = f"#{rng.randrange(16**6):06x}"
    return rng.choice(
        [
            f'  <rect x="{rng.randint(0, 400)}" y="{rng.randint(0, 400)}" width="{rng.randint(5, 200)}" '
            f'height="{rng.randint(5, 200)}" fill="{fill}"/>',
            f'  <circle cx="{rng.randint(0, 400)}" cy="{rng.randint(0, 400)}" r="{rng.randint(2, 90)}" '
            f'stroke="#000" stroke-width="{rng.randint(1, 4)}" fill="{fill}"/>',
            '  <path d="M'
            + " L".join(f"{rng.uniform(0, 400):.2f},{rng.uniform(0, 400):.2f}" for _ in range(rng.randint(3, 12)))
            + f' Z" fill="{fill}"/>',
            f'  <text x="{rng.randint(0, 400)}" y="{rng.randint(0, 400)}" font-family="sans-serif" '
            f'font-size="{rng.randint(8, 30)}">{_sentence(rng, 1, 4)[:-1]}</text>',
        ]
    )


def _svg(rng):
    w, h = rng.randint(64, 1024), rng.randint(64, 1024)
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
    if rng.random() < 0.5:
        head = '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n' + head
    return _grow(rng, head, _svg_shape, "</svg>\n")


def _record(rng):
    """A flat record with the kinds of fields real exports have."""
    return {
        "id": rng.randint(1, 10**6),
        "name": _name(rng),
        "email": _email(rng),
        "city": rng.choice(_CITIES),
        "created": _date(rng),
        "score": round(rng.uniform(0, 100), 2),
        "active": rng.random() < 0.7,
        rng.choice(_NOUNS): _sentence(rng, 2, 8),
    }


def _records_for_size(rng, bytes_per_record=180):
    return [_record(rng) for _ in range(max(2, _text_size(rng) // bytes_per_record))]


def _nested(rng, depth=0):
    if depth > 2 or rng.random() < 0.3:
        return rng.choice(
            [rng.randint(0, 10**4), round(rng.uniform(-1e3, 1e3), 3), _sentence(rng, 1, 6), rng.random() < 0.5, None]
        )
    if rng.random() < 0.5:
        return [_nested(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    return {_snake(rng): _nested(rng, depth + 1) for _ in range(rng.randint(1, 5))}


def _json(rng):
    if rng.random() < 0.5:
        data = _records_for_size(rng, 250)
    else:
        data = {
            "version": f"{rng.randint(0, 9)}.{rng.randint(0, 20)}",
            "generated": _date(rng),
            "items": [_nested(rng) for _ in range(max(1, _text_size(rng) // 200))],
        }
    return json.dumps(data, indent=rng.choice([2, 4])).encode("utf-8")


def _jsonl(rng):
    return "".join(json.dumps(r) + "\n" for r in _records_for_size(rng)).encode("utf-8")


def _delimited(rng, delimiter):
    rows = _records_for_size(rng, 110)
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=rng.choice(["\n", "\r\n"]))
    keys = ["id", "name", "email", "city", "created", "score", "active"]
    writer.writerow(keys)
    for row in rows:
        writer.writerow([row[k] for k in keys])
    return out.getvalue().encode("utf-8")


def _csv(rng):
    return _delimited(rng, ",")


def _tsv(rng):
    return _delimited(rng, "\t")


def _yaml_block(rng):
    name = rng.choice(_NOUNS)
    return rng.choice(
        [
            f"  - name: {_snake(rng)}\n    image: {name}:{rng.randint(1, 9)}.{rng.randint(0, 20)}\n"
            f"    ports:\n      - containerPort: {rng.randint(1000, 9999)}\n"
            f'    env:\n      - name: {name.upper()}_URL\n        value: "http://{name}:{rng.randint(1000, 9999)}"',
            f"  - name: {_sentence(rng, 2, 4)[:-1]}\n    run: |\n      pip install -r requirements.txt\n"
            f"      pytest -q tests/{name}\n    if: github.event_name == 'push'",
            f"  {name}:\n    enabled: {str(rng.random() < 0.5).lower()}\n    retries: {rng.randint(0, 9)}\n"
            f"    timeout: {rng.randint(1, 120)}s\n    tags: [{', '.join(rng.sample(_NOUNS, 3))}]",
        ]
    )


def _yaml(rng):
    head = rng.choice(
        [
            f"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {rng.choice(_NOUNS)}-{rng.choice(_NOUNS)}\n"
            f"  labels:\n    app: {rng.choice(_NOUNS)}\nspec:\n  replicas: {rng.randint(1, 5)}\n  containers:",
            f"# {_sentence(rng)}\nname: {_sentence(rng, 1, 3)[:-1]}\non:\n  push:\n    branches: [main]\n"
            f"jobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:",
            f"---\nversion: {rng.randint(1, 3)}\n# {_sentence(rng)}\nservices:",
        ]
    )
    return _grow(rng, head, _yaml_block, "")


def _ini_section(rng):
    lines = [f"[{rng.choice(_NOUNS)}{rng.choice(['', '.' + rng.choice(_NOUNS)])}]"]
    for _ in range(rng.randint(2, 7)):
        value = rng.choice(
            [
                str(rng.randint(0, 65535)),
                rng.choice(["true", "false", "yes", "no"]),
                f"/var/lib/{rng.choice(_NOUNS)}",
                _email(rng),
                rng.choice(_NOUNS),
            ]
        )
        lines.append(f"{_snake(rng)} = {value}")
    if rng.random() < 0.3:
        lines.insert(1, f"; {_sentence(rng)}")
    return "\n".join(lines) + "\n"


def _ini(rng):
    return _grow(rng, f"; {_sentence(rng)}\n", _ini_section, "")


def _toml_section(rng):
    lines = [f"[{rng.choice(['', 'tool.'])}{rng.choice(_NOUNS)}]"]
    for _ in range(rng.randint(2, 6)):
        value = rng.choice(
            [
                str(rng.randint(0, 9999)),
                f'"{rng.choice(_NOUNS)}"',
                "true",
                "false",
                "[" + ", ".join(f'"{w}"' for w in rng.sample(_NOUNS, 3)) + "]",
                f'{{ version = "{rng.randint(0, 3)}.{rng.randint(0, 30)}", optional = true }}',
            ]
        )
        lines.append(f"{rng.choice(_NOUNS)}{rng.choice(['', '-' + rng.choice(_NOUNS)])} = {value}")
    return "\n".join(lines) + "\n"


def _toml(rng):
    head = (
        f'[package]\nname = "{rng.choice(_NOUNS)}-{rng.choice(_NOUNS)}"\n'
        f'version = "{rng.randint(0, 3)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"\n'
        f'authors = ["{_name(rng)} <{_email(rng)}>"]\nedition = "2021"\n'
    )
    return _grow(rng, head, _toml_section, "")


def _markdown_block(rng):
    return rng.choice(
        [
            f"## {_sentence(rng, 2, 6)[:-1]}\n\n{_paragraph(rng)}\n",
            "\n".join(f"- {_sentence(rng, 3, 9)}" for _ in range(rng.randint(2, 6))) + "\n",
            f"```bash\n{rng.choice(['pip install', 'npm install', 'cargo add'])} {rng.choice(_NOUNS)}\n```\n",
            f"{_paragraph(rng)} See [the {rng.choice(_NOUNS)} guide](https://example.com/{rng.choice(_NOUNS)}) "
            f"and **{_word(rng)}** for `{_snake(rng)}`.\n",
            "| Name | Value |\n|------|-------|\n"
            + "\n".join(f"| `{_snake(rng)}` | {rng.randint(0, 999)} |" for _ in range(rng.randint(2, 5)))
            + "\n",
        ]
    )


def _markdown(rng):
    head = f"# {_sentence(rng, 2, 5)[:-1]}\n\n{_paragraph(rng)}\n"
    return _grow(rng, head, _markdown_block, "")


def _txt(rng):
    return _grow(rng, _paragraph(rng), lambda r: "\n" + _paragraph(r, 3, 8), "", joiner="\n")


def _sql_statement(rng):
    table = rng.choice(_NOUNS) + "s"
    return rng.choice(
        [
            f"CREATE TABLE {table} (\n    id INTEGER PRIMARY KEY,\n    name VARCHAR({rng.choice([64, 128, 255])}) NOT NULL,\n"
            f"    {rng.choice(_NOUNS)}_id INTEGER REFERENCES {rng.choice(_NOUNS)}s(id),\n"
            f"    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP\n);\n",
            f"INSERT INTO {table} (id, name, email, score) VALUES\n"
            + ",\n".join(
                f"    ({rng.randint(1, 99999)}, '{_name(rng)}', '{_email(rng)}', {rng.uniform(0, 100):.2f})"
                for _ in range(rng.randint(2, 8))
            )
            + ";\n",
            f"SELECT u.name, COUNT(o.id) AS {rng.choice(_NOUNS)}_count\nFROM {table} u\n"
            f"LEFT JOIN {rng.choice(_NOUNS)}s o ON o.{rng.choice(_NOUNS)}_id = u.id\n"
            f"WHERE u.created_at > '{_date(rng)}'\nGROUP BY u.name\nORDER BY 2 DESC\nLIMIT {rng.randint(5, 100)};\n",
            f"UPDATE {table} SET {rng.choice(_NOUNS)} = {rng.randint(0, 999)} WHERE id = {rng.randint(1, 9999)};\n",
            f"CREATE INDEX idx_{table}_{rng.choice(_NOUNS)} ON {table} ({rng.choice(_NOUNS)});\n",
        ]
    )


def _sql(rng):
    return _grow(rng, f"-- {_sentence(rng)}\n", _sql_statement, "")


def _latex_block(rng):
    return rng.choice(
        [
            f"\\section{{{_sentence(rng, 2, 5)[:-1]}}}\n{_paragraph(rng)}\n",
            f"\\subsection{{{_sentence(rng, 2, 4)[:-1]}}}\\label{{sec:{rng.choice(_NOUNS)}}}\n{_paragraph(rng)}"
            f" As shown in~\\cite{{{rng.choice(_LAST).lower()}{rng.randint(1990, 2023)}}}.\n",
            f"\\begin{{equation}}\n  {rng.choice('xyzf')}_{{{rng.choice('ijk')}}} = \\sum_{{n=0}}^{{N}} "
            f"\\frac{{\\alpha_n}}{{{rng.randint(2, 9)}}} \\cdot {rng.choice('abc')}^n\n\\end{{equation}}\n",
            "\\begin{itemize}\n"
            + "".join(f"  \\item {_sentence(rng, 3, 8)}\n" for _ in range(rng.randint(2, 5)))
            + "\\end{itemize}\n",
        ]
    )


def _latex(rng):
    head = (
        f"\\documentclass[{rng.choice(['11pt', '12pt', 'a4paper'])}]{{{rng.choice(['article', 'report'])}}}\n"
        f"\\usepackage{{amsmath}}\n\\usepackage{{graphicx}}\n\\title{{{_sentence(rng, 2, 6)[:-1]}}}\n"
        f"\\author{{{_name(rng)}}}\n\\begin{{document}}\n\\maketitle\n"
    )
    return _grow(rng, head, _latex_block, "\\end{document}\n")


def _rtf(rng):
    head = (
        "{\\rtf1\\ansi\\ansicpg1252\\deff0\\nouicompat{\\fonttbl{\\f0\\fnil\\fcharset0 Calibri;}"
        "{\\f1\\fnil Times New Roman;}}\n{\\colortbl ;\\red0\\green0\\blue255;}\n\\viewkind4\\uc1\n"
    )

    def paragraph(r):
        bold = "\\b " if r.random() < 0.2 else ""
        return f"\\pard\\sa200\\sl276\\slmult1\\f0\\fs{r.choice([20, 22, 24])} {bold}{_paragraph(r)}\\b0\\par"

    return _grow(rng, head, paragraph, "}\n")


def _srt(rng):
    counter = iter(range(1, 10**6))

    def cue(r):
        i = next(counter)
        start = i * 3 + r.randint(0, 2)
        return (
            f"{i}\n00:{start // 60:02d}:{start % 60:02d},{r.randint(0, 999):03d} --> "
            f"00:{(start + 2) // 60:02d}:{(start + 2) % 60:02d},{r.randint(0, 999):03d}\n"
            f"{_sentence(r, 3, 9)}\n"
        )

    return _grow(rng, cue(rng), cue, "")


def _vtt(rng):
    def cue(r):
        s = r.randint(0, 3500)
        return (
            f"\n{s // 60:02d}:{s % 60:02d}.{r.randint(0, 999):03d} --> "
            f"{(s + 3) // 60:02d}:{(s + 3) % 60:02d}.{r.randint(0, 999):03d}\n{_sentence(r, 3, 9)}"
        )

    return _grow(rng, "WEBVTT\n", cue, "")


def _diff(rng):
    def hunk(r):
        path = f"src/{r.choice(_NOUNS)}/{_snake(r)}.py"
        line = r.randint(1, 400)
        ctx = [f" {_python_function(r).splitlines()[0]}", f"     {r.choice(_NOUNS)} = {r.randint(0, 99)}"]
        return (
            f"diff --git a/{path} b/{path}\nindex {r.randrange(16**7):07x}..{r.randrange(16**7):07x} 100644\n"
            f"--- a/{path}\n+++ b/{path}\n@@ -{line},6 +{line},7 @@\n"
            + "\n".join(ctx)
            + f"\n-    return {_snake(r)}({r.choice(_NOUNS)})\n+    {r.choice(_NOUNS)} = {_snake(r)}()\n"
            f"+    return {r.choice(_NOUNS)}\n     # {_sentence(r)}\n"
        )

    return _grow(rng, hunk(rng), hunk, "")


def _ics(rng):
    def event(r):
        d = _date(r).replace("-", "")
        return (
            f"BEGIN:VEVENT\r\nUID:{r.randrange(16**12):012x}@{r.choice(_NOUNS)}.com\r\n"
            f"DTSTAMP:{d}T{r.randint(0, 23):02d}0000Z\r\nDTSTART:{d}T{r.randint(0, 23):02d}0000Z\r\n"
            f"DTEND:{d}T{r.randint(0, 23):02d}3000Z\r\nSUMMARY:{_sentence(r, 2, 6)}\r\n"
            f"LOCATION:{r.choice(_CITIES)}\r\nEND:VEVENT"
        )

    head = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Example Corp//Calendar 1.0//EN\r\nCALSCALE:GREGORIAN"
    return _grow(rng, head, event, "END:VCALENDAR\r\n", joiner="\r\n")


def _eml(rng):
    sender, to = _email(rng), _email(rng)
    head = (
        f"Return-Path: <{sender}>\nReceived: from mail.{rng.choice(_NOUNS)}.com (mail.{rng.choice(_NOUNS)}.com "
        f"[10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}])\n        by mx.example.com with ESMTPS id "
        f"{rng.randrange(16**10):010x}\n        for <{to}>; Wed, 17 May 2023 10:{rng.randint(10, 59)}:00 +0000\n"
        f"Message-ID: <{rng.randrange(16**16):016x}@{rng.choice(_NOUNS)}.com>\n"
        f"Date: Wed, 17 May 2023 10:{rng.randint(10, 59)}:00 +0000\nFrom: {_name(rng)} <{sender}>\n"
        f"To: {_name(rng)} <{to}>\nSubject: {_sentence(rng, 2, 7)[:-1]}\nMIME-Version: 1.0\n"
        f'Content-Type: text/plain; charset="UTF-8"\nContent-Transfer-Encoding: 7bit\n\nHi {rng.choice(_FIRST)},\n'
    )
    return _grow(rng, head, lambda r: "\n" + _paragraph(r), f"\nBest regards,\n{_name(rng)}\n")


def _makefile(rng):
    def rule(r):
        target = r.choice(_NOUNS)
        return (
            f"{target}: {' '.join(f'{n}.o' for n in r.sample(_NOUNS, r.randint(1, 4)))}\n"
            f"\t$(CC) $(CFLAGS) -o $@ $^ $(LDFLAGS)\n"
        )

    head = (
        "CC ?= gcc\nCFLAGS ?= -O2 -Wall -Wextra\nLDFLAGS ?=\nPREFIX ?= /usr/local\n\n"
        ".PHONY: all clean install\n\nall: "
        + " ".join(rng.sample(_NOUNS, 2))
        + "\n\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n"
    )
    return _grow(rng, head, rule, "clean:\n\trm -f *.o\n\ninstall: all\n\tinstall -m 755 $(BIN) $(PREFIX)/bin\n")


def _dockerfile(rng):
    def step(r):
        return r.choice(
            [
                "RUN apt-get update && apt-get install -y --no-install-recommends \\\n    "
                + " \\\n    ".join(
                    r.sample(
                        [
                            "curl",
                            "git",
                            "ca-certificates",
                            "build-essential",
                            "libpq-dev",
                            "python3-dev",
                            "wget",
                            "unzip",
                            "gnupg",
                        ],
                        4,
                    )
                )
                + " \\\n    && rm -rf /var/lib/apt/lists/*\n",
                f"COPY {r.choice(_NOUNS)}/ /app/{r.choice(_NOUNS)}/\n",
                f"ENV {r.choice(_NOUNS).upper()}_{r.choice(_NOUNS).upper()}={r.randint(0, 9999)}\n",
                "RUN pip install --no-cache-dir -r requirements.txt\n",
                f"# {_sentence(r)}\nWORKDIR /app/{r.choice(_NOUNS)}\n",
            ]
        )

    head = (
        f"FROM {rng.choice(['python:3.11-slim', 'ubuntu:22.04', 'node:20-alpine', 'debian:bookworm'])}\n"
        f'LABEL maintainer="{_email(rng)}"\n'
    )
    return _grow(rng, head, step, f'EXPOSE {rng.randint(1000, 9999)}\nCMD ["{_snake(rng)}"]\n')


# ---------------------------------------------------------------------------------------------
# Images. A gradient background with shapes (and noise for photo-like JPEGs) gives the encoders
# realistic work: flat areas, edges and texture, rather than pure noise that nothing compresses.


def _picture(rng, photo=False):
    w, h = rng.randint(16, 320), rng.randint(16, 320)
    nrng = np.random.default_rng(rng.getrandbits(32))
    start, stop = nrng.integers(0, 256, 3), nrng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, w)[None, :, None] * np.linspace(0.5, 1.0, h)[:, None, None]
    pixels = start + (stop - start) * ramp
    if photo:
        pixels = pixels + nrng.normal(0, rng.uniform(2, 20), (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 8)):
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, h - 1)
        box = (x0, y0, rng.randint(x0, w), rng.randint(y0, h))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        rng.choice([draw.rectangle, draw.ellipse])(box, fill=colour)
    return img


def _save(img, fmt, **options):
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _png(rng):
    img = _picture(rng)
    mode = rng.choice(["RGB", "RGBA", "L", "P"])
    img = img.convert(mode) if mode != "P" else img.quantize(rng.choice([16, 64, 256]))
    return _save(img, "PNG", compress_level=rng.randint(1, 9))


def _jpeg(rng):
    img = _picture(rng, photo=True)
    if rng.random() < 0.2:
        img = img.convert("L")
    return _save(img, "JPEG", quality=rng.randint(50, 95), progressive=rng.random() < 0.3)


def _gif(rng):
    return _save(_picture(rng).quantize(rng.choice([8, 32, 128, 256])), "GIF")


def _bmp(rng):
    return _save(_picture(rng).convert(rng.choice(["RGB", "L", "P"])), "BMP")


def _tiff(rng):
    return _save(_picture(rng), "TIFF", compression=rng.choice([None, "tiff_lzw", "tiff_adobe_deflate", "packbits"]))


def _webp(rng):
    return _save(
        _picture(rng, photo=rng.random() < 0.5), "WEBP", quality=rng.randint(50, 95), lossless=rng.random() < 0.3
    )


def _ico(rng):
    side = rng.choice([16, 32, 48, 64])
    sizes = [(s, s) for s in (16, 32, 48, 64) if s <= side]
    return _save(_picture(rng).resize((side, side)), "ICO", sizes=sizes)


def _image_pdf(rng):
    stamp = time.struct_time((*FIXED_DATE, 2, 137, 0))
    return _save(
        _picture(rng, photo=True),
        "PDF",
        resolution=rng.choice([72.0, 96.0, 150.0]),
        title=_sentence(rng, 2, 5)[:-1],
        creationDate=stamp,
        modDate=stamp,
    )


def _text_pdf(rng):
    """A one-page text PDF written object by object, with a correct cross-reference table, like
    the many small reports and letters real PDF writers produce."""
    lines = [_sentence(rng, 4, 10) for _ in range(max(3, _text_size(rng) // 70))]
    ops = ["BT", f"/F1 {rng.choice([10, 11, 12])} Tf", "14 TL", "72 770 Td"]
    ops += [f"({line}) Tj T*" for line in lines] + ["ET"]
    content, filters = "\n".join(ops).encode("latin-1"), b""
    if rng.random() < 0.5:  # most writers deflate page content; some leave it readable
        content, filters = zlib.compress(content), b" /Filter /FlateDecode"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d%s >>\nstream\n" % (len(content), filters) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /" + rng.choice([b"Helvetica", b"Times-Roman", b"Courier"]) + b" >>",
        b"<< /Producer (" + _sentence(rng, 1, 3)[:-1].encode() + b") /CreationDate (D:20230517103000Z) >>",
    ]
    out = bytearray(b"%PDF-1." + str(rng.randint(3, 7)).encode() + b"\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _pdf(rng):
    return _text_pdf(rng) if rng.random() < 0.6 else _image_pdf(rng)


# ---------------------------------------------------------------------------------------------
# Archives and compressed streams. Their payloads are other generated files, as in real life.

_PAYLOADS = {
    "py": _python,
    "js": _javascript,
    "json": _json,
    "csv": _csv,
    "txt": _txt,
    "md": _markdown,
    "html": _html,
    "png": _png,
    "xml": _xml,
    "c": _c,
}


def _payload(rng):
    """A (file name, content) pair for an archive member."""
    ext = rng.choice(sorted(_PAYLOADS))
    return f"{rng.choice(_NOUNS)}_{rng.randint(1, 99)}.{ext}", _PAYLOADS[ext](rng)


def _zip(rng):
    out = io.BytesIO()
    method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
    with zipfile.ZipFile(out, "w", method) as archive:
        folder = rng.choice(["", f"{rng.choice(_NOUNS)}/"])
        for _ in range(rng.randint(1, 6)):
            name, data = _payload(rng)
            info = zipfile.ZipInfo(folder + name, FIXED_DATE)
            info.compress_type, info.external_attr = method, 0o644 << 16
            archive.writestr(info, data)
    return out.getvalue()


def _tar(rng):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        root = f"{rng.choice(_NOUNS)}-{rng.randint(0, 9)}.{rng.randint(0, 20)}"
        for _ in range(rng.randint(1, 5)):
            name, data = _payload(rng)
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size, info.mtime, info.mode = len(data), FIXED_EPOCH, 0o644
            info.uname = info.gname = rng.choice(["root", "build", rng.choice(_FIRST).lower()])
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _stream_payload(rng):
    """Compressors mostly wrap tarballs, logs and data dumps."""
    return _tar(rng) if rng.random() < 0.5 else _payload(rng)[1]


def _gzip(rng):
    return gzip.compress(_stream_payload(rng), compresslevel=rng.randint(1, 9), mtime=FIXED_EPOCH)


def _bzip(rng):
    return bz2.compress(_stream_payload(rng), compresslevel=rng.randint(1, 9))


def _xz(rng):
    return lzma.compress(_stream_payload(rng), preset=rng.randint(0, 6))


# ---------------------------------------------------------------------------------------------
# Audio and other binary formats.


def _wav(rng):
    rate = rng.choice([8000, 16000, 22050, 44100])
    channels, seconds = rng.choice([1, 2]), rng.uniform(0.05, 1.0)
    nrng = np.random.default_rng(rng.getrandbits(32))
    t = np.arange(int(rate * seconds)) / rate
    tone = sum(np.sin(2 * np.pi * rng.uniform(80, 2000) * t + rng.uniform(0, 6)) for _ in range(3)) / 3
    signal = 0.6 * tone * np.exp(-t * rng.uniform(0, 4)) + nrng.normal(0, 0.02, t.size)
    samples = np.repeat((np.clip(signal, -1, 1) * 32000).astype("<i2")[:, None], channels, axis=1)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


def _midi_varlen(value):
    out = [value & 0x7F]
    while value > 0x7F:
        value >>= 7
        out.insert(0, (value & 0x7F) | 0x80)
    return bytes(out)


def _midi_track(rng, channel):
    events = bytearray(b"\x00\xff\x03" + bytes([7]) + b"Track %d" % channel)
    events += b"\x00" + bytes([0xC0 | channel, rng.randint(0, 127)])
    for _ in range(rng.randint(8, 300)):
        note, velocity, length = rng.randint(36, 96), rng.randint(40, 127), rng.choice([120, 240, 480])
        events += b"\x00" + bytes([0x90 | channel, note, velocity])
        events += _midi_varlen(length) + bytes([0x80 | channel, note, 0])
    events += b"\x00\xff\x2f\x00"
    return b"MTrk" + struct.pack(">I", len(events)) + bytes(events)


def _midi(rng):
    tracks = [_midi_track(rng, channel) for channel in range(rng.randint(1, 4))]
    tempo = b"\x00\xff\x51\x03" + struct.pack(">I", rng.randint(300000, 800000))[1:] + b"\x00\xff\x2f\x00"
    tracks.insert(0, b"MTrk" + struct.pack(">I", len(tempo)) + tempo)
    return b"MThd" + struct.pack(">IHHH", 6, 1, len(tracks), 480) + b"".join(tracks)


def _pickle(rng):
    data = rng.choice([_records_for_size(rng, 200), {"config": _nested(rng), "rows": _records_for_size(rng, 400)}])
    return pickle.dumps(data, protocol=rng.choice([2, 3, 4, 5]))


def _npy(rng):
    nrng = np.random.default_rng(rng.getrandbits(32))
    shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 3)))
    dtype = rng.choice(["<f4", "<f8", "<i4", "<i8", "|u1"])
    out = io.BytesIO()
    np.save(out, (nrng.normal(0, 100, shape)).astype(dtype))
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Labels, features and batches.

# magika label -> generator. The order is fixed: file i gets type i % len(GENERATORS), so any
# prefix of the data set is balanced across types.
GENERATORS = {
    "python": _python,
    "javascript": _javascript,
    "c": _c,
    "java": _java,
    "go": _go,
    "rust": _rust,
    "php": _php,
    "ruby": _ruby,
    "shell": _shell,
    "css": _css,
    "html": _html,
    "xml": _xml,
    "svg": _svg,
    "json": _json,
    "jsonl": _jsonl,
    "csv": _csv,
    "tsv": _tsv,
    "yaml": _yaml,
    "ini": _ini,
    "toml": _toml,
    "markdown": _markdown,
    "txt": _txt,
    "sql": _sql,
    "latex": _latex,
    "rtf": _rtf,
    "srt": _srt,
    "vtt": _vtt,
    "diff": _diff,
    "ics": _ics,
    "eml": _eml,
    "makefile": _makefile,
    "dockerfile": _dockerfile,
    "png": _png,
    "jpeg": _jpeg,
    "gif": _gif,
    "bmp": _bmp,
    "tiff": _tiff,
    "webp": _webp,
    "ico": _ico,
    "pdf": _pdf,
    "zip": _zip,
    "tar": _tar,
    "gzip": _gzip,
    "bzip": _bzip,
    "xz": _xz,
    "wav": _wav,
    "midi": _midi,
    "pickle": _pickle,
    "npy": _npy,
}


@lru_cache(maxsize=1)
def _model_config():
    return Magika._load_model_config(MODEL_DIR / "config.min.json")


@lru_cache(maxsize=1)
def label_index():
    """magika label name -> index in the model's output vector."""
    space = [str(label) for label in _model_config().target_labels_space]
    missing = sorted(set(GENERATORS) - set(space))
    if missing:
        raise ValueError(f"not in the model's target_labels_space: {missing}")
    return {label: space.index(label) for label in GENERATORS}


def features(content):
    """The model's `bytes` row for one file, via magika's own extraction (strip whitespace, first
    and last 1,024 bytes of the first and last 4 KB block, pad with 256), concatenated the way
    `Magika._get_raw_predictions` does it."""
    cfg = _model_config()
    fs = Magika._extract_features_from_seekable(
        Seekable(io.BytesIO(content)),
        cfg.beg_size,
        cfg.mid_size,
        cfg.end_size,
        cfg.padding_token,
        cfg.block_size,
        cfg.use_inputs_at_offsets,
    )
    return fs.beg[: cfg.beg_size] + fs.end[-cfg.end_size :]


def make_files(count, seed):
    """`count` (label, content) pairs, types cycling through GENERATORS in order."""
    rng = random.Random(seed)
    labels = list(GENERATORS)
    return [(labels[i % len(labels)], GENERATORS[labels[i % len(labels)]](rng)) for i in range(count)]


def make_batches(count, seed, batch_size=BATCH_SIZE):
    """Return [(inputs, labels)] batches of `count` generated files."""
    index = label_index()
    files = make_files(count, seed)
    rows = np.array([features(content) for _, content in files], dtype=np.int32)
    labels = np.array([index[label] for label, _ in files], dtype=np.int64)
    return [({"bytes": rows[i : i + batch_size]}, labels[i : i + batch_size]) for i in range(0, count, batch_size)]


def evaluation_files():
    return make_batches(EVAL_FILES, EVAL_SEED)


def calibration_files():
    return make_batches(CALIB_FILES, CALIB_SEED)
