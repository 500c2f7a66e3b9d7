-- pandoc Lua filter: docs/overlayctl.md (written for reading on the web) as a man page.
--   pandoc -s -f gfm+definition_lists -t man --lua-filter=debian/manpage.lua -M docdir=DIR \
--       docs/overlayctl.md
-- * The first heading, "# NAME(SECTION)", becomes the title and section (.TH); the other
--   headings move up a level, so "## OPTIONS" is .SH OPTIONS and "### ..." is .SS.
-- * The NAME paragraph gets the "name \- description" form that whatis and lexgrog read.
-- * A link to a sibling document (design.md) names the installed file, DOCDIR/design.md.
-- Fails on a document without such a title, rather than writing a page without one.

local function fail(msg)
  io.stderr:write("manpage.lua: " .. msg .. "\n")
  os.exit(1)
end

local docdir = "."

local function doc_link(link)
  local file = link.target:match("^([%w%-_]+%.md)$") or link.target:match("^([%w%-_]+%.md)#")
  if not file then
    return nil
  end
  local path = pandoc.Emph({ pandoc.Str(docdir .. "/" .. file) })
  if pandoc.utils.stringify(link.content) == file then
    return path
  end
  local out = link.content
  out:insert(pandoc.Space())
  out:insert(pandoc.Str("("))
  out:insert(path)
  out:insert(pandoc.Str(")"))
  return out
end

-- In a definition with several blocks (text, a list, more text), the man writer glues a
-- Plain block onto the end of the list before it: make them paragraphs.
local function definitions(dl)
  for _, item in ipairs(dl.content) do
    for _, def in ipairs(item[2]) do
      if #def > 1 then
        for i, b in ipairs(def) do
          if b.t == "Plain" then
            def[i] = pandoc.Para(b.content)
          end
        end
      end
    end
  end
  return dl
end

-- Pipe tables get column widths from their |---|---| line, i.e. equal ones: give each column
-- but the last the width of its longest cell (up to 40%), and the last one the rest.
local function table_widths(tbl)
  local n = #tbl.colspecs
  if n < 2 then
    return nil
  end
  local longest = {}
  for i = 1, n do
    longest[i] = 1
  end
  local function measure(rows)
    for _, row in ipairs(rows) do
      for i, cell in ipairs(row.cells) do
        if i <= n then
          longest[i] = math.max(longest[i], utf8.len(pandoc.utils.stringify(cell.contents)) or 1)
        end
      end
    end
  end
  measure(tbl.head.rows)
  for _, body in ipairs(tbl.bodies) do
    measure(body.body)
  end
  local total, used = 72, 0
  for i = 1, n - 1 do
    local w = math.min(longest[i] + 3, 0.4 * total) / total
    tbl.colspecs[i] = { tbl.colspecs[i][1], w }
    used = used + w
  end
  tbl.colspecs[n] = { tbl.colspecs[n][1], math.max(1 - used - 0.05, 0.2) }
  return tbl
end

-- "e.g. /usr": a no-break space, or the man writer ends a sentence (and a line) after "e.g."
local function abbreviations(inlines)
  for i = 1, #inlines - 1 do
    local s = inlines[i]
    if s.t == "Str" and (s.text:match("e%.g%.$") or s.text:match("i%.e%.$")) and inlines[i + 1].t == "Space" then
      inlines[i + 1] = pandoc.Str("\u{a0}")
    end
  end
  return inlines
end

local function name_line(para)
  -- "overlayctl — merge ..." -> "overlayctl \- merge ...", as man-pages(7) writes it
  return pandoc.walk_block(para, {
    Str = function(s)
      if s.text == "—" or s.text == "–" then
        return pandoc.RawInline("man", "\\-")
      end
    end,
  })
end

local function title(doc)
  local first = doc.blocks[1]
  if not (first and first.t == "Header" and first.level == 1) then
    fail("the document must start with a '# NAME(SECTION)' heading")
  end
  local name, section = pandoc.utils.stringify(first):match("^([%w%-_.]+)%((%w+)%)$")
  if not name then
    fail("first heading is not NAME(SECTION): " .. pandoc.utils.stringify(first))
  end
  doc.meta.title = pandoc.MetaString(name:upper())
  doc.meta.section = pandoc.MetaString(section)
  if doc.meta.docdir then
    docdir = pandoc.utils.stringify(doc.meta.docdir)
  end

  local blocks = pandoc.List()
  local after_name = false
  for i = 2, #doc.blocks do
    local b = doc.blocks[i]
    if b.t == "Header" then
      if b.level == 1 then
        fail("a second level-1 heading: " .. pandoc.utils.stringify(b))
      end
      b.level = b.level - 1
      after_name = pandoc.utils.stringify(b) == "NAME"
    elseif after_name and b.t == "Para" then
      b = name_line(b)
      after_name = false
    end
    blocks:insert(b)
  end
  doc.blocks = blocks
  return doc
end

return {
  { Pandoc = title },
  { Link = doc_link, DefinitionList = definitions, Table = table_widths, Inlines = abbreviations },
}
