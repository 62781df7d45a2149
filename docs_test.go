package main

// docs_test.go holds the README and docs/ to the repository: every relative
// link and anchor resolves, every docs page can be reached from the README,
// every function the reading tour names exists, and every test a page names
// is one the suite runs.

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// maxREADME is the README's budget: what a newcomer reads before the code.
const maxREADME = 15000

var (
	mdLink       = regexp.MustCompile(`\[([^\]]*)\]\(([^)\s]+)\)`)
	mdHeading    = regexp.MustCompile(`^#{1,6}\s+(.*?)\s*#*\s*$`)
	codeSpan     = regexp.MustCompile("`([^`]+)`")
	testFuncName = regexp.MustCompile(`^(Test|Fuzz|Benchmark)[A-Z]\w*$`)
	goFuncName   = regexp.MustCompile(`^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$`)
)

// mdPage is a Markdown file's links and anchors, code blocks left out.
type mdPage struct {
	links   [][2]string // text, target
	anchors map[string]bool
	lines   []string // outside code blocks
}

func readPage(t *testing.T, path string) mdPage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := mdPage{anchors: map[string]bool{}}
	seen := map[string]int{}
	inCode := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inCode = !inCode
			continue
		}
		if inCode {
			continue
		}
		p.lines = append(p.lines, line)
		if m := mdHeading.FindStringSubmatch(line); m != nil {
			a := slug(m[1])
			if n := seen[a]; n > 0 {
				p.anchors[a+"-"+strconv.Itoa(n)] = true
			} else {
				p.anchors[a] = true
			}
			seen[a]++
		}
		for _, m := range mdLink.FindAllStringSubmatch(line, -1) {
			p.links = append(p.links, [2]string{m[1], m[2]})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return p
}

// slug is GitHub's anchor for a heading: lower case, punctuation dropped
// (but - and _), spaces made hyphens.
func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

func markdownFiles(t *testing.T) []string {
	t.Helper()
	files := []string{"README.md"}
	err := filepath.WalkDir("docs", func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(path, ".md") {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// goDecls is every function and method declared in the package's files,
// by name and by receiver.name, split by test and non-test files.
func goDecls(t *testing.T) (code, tests map[string]string) {
	t.Helper()
	decl := regexp.MustCompile(`(?m)^func (?:\(\w+ \*?(\w+)(?:\[[^\]]*\])?\) )?(\w+)[\[(]`)
	code, tests = map[string]string{}, map[string]string{}
	files, _ := filepath.Glob("*.go")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		into := code
		if strings.HasSuffix(f, "_test.go") {
			into = tests
		}
		for _, m := range decl.FindAllStringSubmatch(string(b), -1) {
			into[m[2]] = f
			if m[1] != "" {
				into[m[1]+"."+m[2]] = f
			}
		}
	}
	return code, tests
}

func TestDocsLinksResolve(t *testing.T) {
	if fi, err := os.Stat("README.md"); err != nil || fi.Size() > maxREADME {
		t.Errorf("README.md is %d bytes, over its budget of %d: the rest belongs in docs/", fi.Size(), maxREADME)
	}
	code, tests := goDecls(t)
	pages := map[string]mdPage{}
	files := markdownFiles(t)
	for _, f := range files {
		pages[f] = readPage(t, f)
	}
	reached := map[string]bool{"README.md": true}
	queue := []string{"README.md"}
	for len(queue) > 0 {
		from := queue[0]
		queue = queue[1:]
		for _, l := range pages[from].links {
			text, target := strings.Trim(l[0], "`"), l[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file, anchor, _ := strings.Cut(target, "#")
			path := from
			if file != "" {
				path = filepath.Clean(filepath.Join(filepath.Dir(from), file))
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Errorf("%s: link [%s](%s): %s does not exist", from, l[0], target, path)
				continue
			}
			if fi.IsDir() {
				continue
			}
			if strings.HasSuffix(path, ".md") {
				if _, ok := pages[path]; !ok {
					pages[path] = readPage(t, path)
				}
				if anchor != "" && !pages[path].anchors[anchor] {
					t.Errorf("%s: link [%s](%s): no heading #%s in %s", from, l[0], target, anchor, path)
				}
				if !reached[path] {
					reached[path] = true
					queue = append(queue, path)
				}
			}
			// A link named for a function must lead to the file that
			// declares it.
			if strings.HasSuffix(path, ".go") && goFuncName.MatchString(text) && !strings.HasSuffix(text, ".go") {
				decls := code
				if strings.HasSuffix(path, "_test.go") {
					decls = tests
				}
				if decls[text] != path {
					t.Errorf("%s: link [%s](%s): %s declares no func %s", from, l[0], target, path, text)
				}
			}
		}
	}
	linked := map[string]bool{}
	for _, l := range pages["README.md"].links {
		file, _, _ := strings.Cut(l[1], "#")
		linked[filepath.Clean(file)] = true
	}
	for _, f := range files {
		if filepath.Dir(f) == "docs" && !linked[f] {
			t.Errorf("README.md links no %s: every page of docs/ is one link away", f)
		}
		if !reached[f] {
			t.Errorf("%s cannot be reached by links from README.md", f)
		}
		// Every test a page names is one the suite has.
		for _, line := range pages[f].lines {
			for _, m := range codeSpan.FindAllStringSubmatch(line, -1) {
				if testFuncName.MatchString(m[1]) && tests[m[1]] == "" {
					t.Errorf("%s names %s, which no test file declares", f, m[1])
				}
			}
		}
	}
	// The reading tour names functions: each must exist.
	tour := false
	for _, line := range pages["README.md"].lines {
		if strings.HasPrefix(line, "## ") {
			tour = strings.Contains(line, "reading tour")
		}
		if !tour {
			continue
		}
		for _, m := range codeSpan.FindAllStringSubmatch(line, -1) {
			name := m[1]
			if goFuncName.MatchString(name) && !slices.Contains([]string{"BEGIN", "COMMIT"}, name) && code[name] == "" {
				t.Errorf("README.md's reading tour names %s, which no file declares", name)
			}
		}
	}
}

func TestSlugIsGitHubs(t *testing.T) {
	for heading, want := range map[string]string{
		"The SKIP LOCKED relay":                              "the-skip-locked-relay",
		"The API against its spec: schemathesis and Redocly": "the-api-against-its-spec-schemathesis-and-redocly",
		"Docker and compose":                                 "docker-and-compose",
		"A reading tour: one order through the code":         "a-reading-tour-one-order-through-the-code",
		"`relay.run` and `GET /orders`":                      "relayrun-and-get-orders",
	} {
		if got := slug(heading); got != want {
			t.Errorf("slug(%q) = %q, want %q", heading, got, want)
		}
	}
}
